"""GPU tests of the transformers `thrift` backend on the CuTe kernels (harness/hf_backend.py, device_policy="kernel"):
prefill through kernels.thrift_attention, decode through kernels.thrift_decode over the FP16+FP4 cache mirror.
A tiny random Llama built here (no download), fp16, head_dim 64, GQA 3:1."""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

hb = pytest.importorskip("harness.hf_backend")
pytest.importorskip("transformers")


def rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=101, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.float16).eval()
    m.set_attn_implementation("sdpa")
    return m


@pytest.mark.parametrize("levers", [{}, {"hadamard": True, "scale_rule": "mse"}], ids=["paper", "hadamard+mse"])
def test_prefill_kernel_path_matches_exact_and_reference(levers):
    """Paper numerics and the kernels' defaults (Hadamard Q/K rotation + mse scale rule) on the kernel path."""
    model = _tiny_llama()
    ids = torch.randint(0, 101, (1, 333), device="cuda")  # not a multiple of 64
    with torch.no_grad():
        ref = model(ids).logits.float()
        with hb.use_thrift(model, hb.ThriftConfig(budget=1.0, device_policy="kernel", **levers)):
            k100 = model(ids).logits.float()
        with hb.use_thrift(model, hb.ThriftConfig(budget=0.05, device_policy="kernel", **levers)):
            k5 = model(ids).logits.float()
        with hb.use_thrift(model, hb.ThriftConfig(budget=0.05, device_policy="reference", **levers)):
            r5 = model(ids).logits.float()
    e100, e5, d5 = rel_l2(k100, ref), rel_l2(k5, r5), rel_l2(r5, ref)
    print(f"{levers}: budget 1.0 kernel vs sdpa {e100:.2e}; budget 0.05 kernel vs reference {e5:.2e}; "
          f"reference vs sdpa {d5:.2e}")
    assert e100 <= 5e-3
    assert d5 > 1e-3  # FP4 really changes the logits, so the kernel/reference comparison means something
    assert e5 <= 0.1 * d5  # the kernel path computes the reference's numbers, not something else


def test_decode_kernel_path_budget1_matches_sdpa():
    model = _tiny_llama()
    ids = torch.randint(0, 101, (1, 130), device="cuda")
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        cache = hb.make_thrift_cache(model.config)
        with hb.use_thrift(model, hb.ThriftConfig(budget=1.0, device_policy="kernel")):
            out = model.generate(ids, past_key_values=cache, **kw)
    assert cache.fp4_layer(0) is not None  # decode steps really ran over the FP4 mirror
    s_ref = torch.stack(ref.scores).float()
    s_out = torch.stack(out.scores).float()
    err = rel_l2(s_out, s_ref)
    print(f"decode scores budget 1.0 kernel vs sdpa: {err:.2e}")
    assert err <= 5e-3
