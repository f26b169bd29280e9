"""A/B of quantizer versions (GPU): each a copy of quant/quant_kernel.py, loaded from its path.

    python profiling/prefill/quant_ab.py check|time [NAME=PATH ...]

check: bit-exactness vs quant.nvfp4 (bf16 D=128: rotation on/off x mse/amax x nibble/bits; fp16 D=64: rotation on/off
x mse/amax; a zero group, an underflowing group, an Inf in V). time: 32k (B=1, H=32, D=128, bf16, rotate, mse, bits --
the SM90 prefill's call), median of do_bench, two rounds, without and (where the version has it) with the Q block
means (with_qmean, the public op's call with kernels.interface.SELECT_FUSED_MEANS). "tree" (quant/quant_kernel.py)
is always included; e.g. old=scratch/old/quant_kernel.py for a previous commit's copy
(git show REV:quant/quant_kernel.py > scratch/old/quant_kernel.py: an untracked file, carried to the device)."""
import importlib.util, sys, torch
sys.path.insert(0, ".")
from triton.testing import do_bench
from quant import nvfp4
from quant.rotation import hadamard_rotate
from kernels.interface import _stream, _torch_to_cutlass, quant_args, quant_outputs
from kernels.kv_cache import _permute_code_words
import cutlass.cute as cute

def load(path, name):
    sp = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(sp); sp.loader.exec_module(m); return m

mode = sys.argv[1] if len(sys.argv) > 1 else ""
if mode not in ("check", "time"):
    sys.exit("usage: quant_ab.py check|time [NAME=PATH ...]")
variants = {"tree": "quant/quant_kernel.py"}
for item in sys.argv[2:]:
    name, _, path = item.partition("=")
    variants[name] = path

def run(mod, q, k, v, rotate, rule, layout, cache, qmean=False):
    """qmean: with the Q block means (with_qmean; a version with Q-mean orders, before session 15: "tail")."""
    D = q.shape[3]
    outs = quant_outputs(q, k, v, with_qmean=qmean)
    args = quant_args(q, k, v, outs)
    key = (q.dtype, D, rotate, rule, layout, qmean)
    if key not in cache:
        has_order = "qmean_order" in mod.QuantKernel.__init__.__code__.co_varnames
        extra = ((True, "tail") if has_order else (True,)) if qmean else ()
        cache[key] = cute.compile(mod.QuantKernel(_torch_to_cutlass(q.dtype), D, False, rotate, rule, layout, *extra),
                                  *args, _stream())
    f = cache[key]
    return outs, (lambda: f(*args, _stream()))

torch.manual_seed(0)
for name, path in variants.items():
    mod = load(path, "qv_" + name); cache = {}
    ok = True
    for dt, D in ((torch.bfloat16, 128), (torch.float16, 64)) if mode == "check" else ():
        if True:
            q = (torch.randn(2, 77, 4, D, device="cuda") * 3).to(dt); k = torch.randn(2, 130, 2, D, device="cuda").to(dt)
            v = torch.randn(2, 130, 2, D, device="cuda").to(dt); k[..., 5] *= 40; q[0, 0, 0, :16] = 0; q[0, 1, 0, :16] = 1e-6
            v[1, 3, 1, 7] = float("inf")
            for rotate in (False, True):
                for rule in ("mse", "amax"):
                    for layout in (("nibble", "bits") if dt == torch.bfloat16 else ("nibble",)):
                        outs, fn = run(mod, q, k, v, rotate, rule, layout, cache); fn(); torch.cuda.synchronize()
                        qq, kk = (hadamard_rotate(q), hadamard_rotate(k)) if rotate else (q, k)
                        rq = nvfp4.quantize(qq, dim=-1, scale_rule=rule); rk = nvfp4.quantize(kk, dim=-1, scale_rule=rule)
                        vpad = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 192 - 130))
                        rv = nvfp4.quantize(vpad.permute(0, 2, 3, 1), dim=-1, scale_rule=rule)
                        cv = (lambda t: _permute_code_words(t, True)) if layout == "bits" else (lambda t: t)
                        good = (torch.equal(outs[0], cv(rq.packed)) and torch.equal(outs[1], rq.scales.view(torch.uint8)) and
                                torch.equal(outs[2], cv(rk.packed)) and torch.equal(outs[3], rk.scales.view(torch.uint8)) and
                                torch.equal(outs[4], cv(rv.packed)) and torch.equal(outs[5], rv.scales.view(torch.uint8)))
                        if not good:
                            ok = False; print(f"  {name}: MISMATCH {dt} D={D} rotate={rotate} {rule} {layout}")
    if mode == "check":
        print(f"quant {name:5s} bit-exact={ok}", flush=True); continue
    S = 32768
    q, k, v = (torch.randn(1, S, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    names = mod.QuantKernel.__init__.__code__.co_varnames
    for qmean in (False, True):
        if qmean and "with_qmean" not in names:
            continue
        outs, fn = run(mod, q, k, v, True, "mse", "bits", cache, qmean); fn()
        ms = [do_bench(fn, warmup=20, rep=500, return_mode="median") for _ in range(2)]
        tag = " +Q means" if qmean else ""
        print(f"quant {name:5s} 32k bf16 rotate mse bits{tag}: {ms[0]:.3f} / {ms[1]:.3f} ms", flush=True)
