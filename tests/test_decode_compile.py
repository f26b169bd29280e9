"""Compile tests of the decode kernels (CPU only): sm_90a and sm_120a with fake tensors, PTX and ptxas checks."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from kernels.decode import compile_decode
    compile_decode({d}, {hkv}, {g}, {dt!r}, {arch}, fp4_layout={layout!r}, parts={parts}, stages={stages},
                   scale_rule={rule!r}, min_ctas={minc}, work={work!r})
""")


def _compile(tmp_path, arch, d, hkv, g, dt, layout="nibble", parts=2, stages=3, rule="mse", minc=0, work="static"):
    dump = tmp_path / f"dump_{arch}"
    dump.mkdir()
    env = dict(os.environ, CUTE_DSL_ARCH=f"sm_{arch}a", CUTE_DSL_KEEP="ptx,cubin", CUTE_DSL_DUMP_DIR=str(dump))
    code = _SCRIPT.format(root=ROOT, d=d, hkv=hkv, g=g, dt=dt, arch=arch, layout=layout, parts=parts, stages=stages,
                         rule=rule, minc=minc, work=work)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    ptx = sorted(p for p in dump.iterdir() if p.suffix == ".ptx")
    dec = [p for p in ptx if "ThriftDecodeSplitKV" in p.name]
    comb = [p for p in ptx if "ThriftDecodeCombine" in p.name]
    assert len(dec) == 1 and len(comb) == 1, [p.name for p in ptx]
    return dec[0], comb[0]


@pytest.mark.compile
@pytest.mark.parametrize("arch,d,hkv,g,dt,layout,parts,stages,rule,minc", [
    (90, 128, 8, 4, "f16", "nibble", 1, 2, "mse", 0), (90, 64, 3, 3, "bf16", "nibble", 2, 4, "amax", 0),
    (120, 128, 8, 4, "f16", "nibble", 1, 3, "mse", 0), (120, 64, 2, 16, "bf16", "nibble", 2, 3, "mse", 0),
    (90, 128, 8, 4, "bf16", "bits", 2, 3, "mse", 15), (120, 64, 2, 16, "f16", "bits", 1, 2, "amax", 0),
    # "pre": what thrift_decode runs (query quantized before launch), with the default pipeline
    (90, 128, 8, 4, "bf16", "bits", 2, 3, "pre", 0), (120, 128, 8, 4, "bf16", "bits", 2, 3, "pre", 15)])
def test_decode_compiles(tmp_path, arch, d, hkv, g, dt, layout, parts, stages, rule, minc):
    dec, comb = _compile(tmp_path, arch, d, hkv, g, dt, layout, parts, stages, rule, minc)
    text = dec.read_text()
    # the query's "mse" scale rule (arch_paths.nvfp4_mse_scale): per lane D/64 groups per n8 head tile, 16 SSE steps
    # (explicit mul.rn then add.rn, never contracted to an FMA) per candidate scale
    from quant.nvfp4 import MSE_SCALE_STEPS

    n_sse = len(re.findall(r"mul\.rn\.f32 mse_e, mse_e, mse_e;\s*add\.rn\.f32 mse_acc, mse_acc, mse_e;", text))
    want = 0 if rule in ("amax", "pre") else (d // 64) * ((g + 7) // 8) * 16 * (1 + len(MSE_SCALE_STEPS))
    assert n_sse == want, (n_sse, want)
    assert re.search(rf"cp\.async\.wait_group\s+{stages - 1};", text)
    assert (f".minnctapersm {minc}" in text) == (minc > 1), "the register cap hint (DecodeConfig.min_ctas)"
    if layout == "bits":  # the shift-and-mask decode of kv_cache's "bits" word layout, no table lookup
        assert "0x8E008E00" in text and "0x0E000E00" in text
        assert "prmt.b32 h0, 0x3E3C3800" not in text
    else:
        assert "prmt.b32 h0, 0x3E3C3800" in text
    assert f".target sm_{arch}a" in text
    mma = "bf16" if dt == "bf16" else "f16"
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in text  # FP4 tiles (decoded, exact in fp16)
    assert f"mma.sync.aligned.m16n8k16.row.col.f32.{mma}.{mma}.f32" in text  # FP16 (selected) tiles
    assert "cp.async.cg.shared.global" in text
    assert "movmatrix.sync.aligned.m8n8.trans.b16" in text
    assert "ld.shared.v4.u32" in text
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas not on PATH")
    for p in (dec, comb):
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", str(p), "-o", os.devnull], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        info = out.stdout + out.stderr
        regs = int(re.search(r"Used (\d+) registers", info).group(1))
        assert regs <= 255
        if minc and p is dec:  # the register-cap knob (not a default): it must cap; a small spill outside the tile
            assert regs <= 65536 // (32 * minc), info  # loop is allowed (sm_90a: 32 B at 128 registers)
        else:
            assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", info), info


@pytest.mark.compile
@pytest.mark.parametrize("arch,d,g,dt,parts,stages", [(90, 128, 4, "bf16", 2, 3), (120, 128, 4, "bf16", 2, 3),
                                                     (90, 64, 16, "f16", 1, 2), (120, 64, 3, "f16", 1, 2)])
def test_decode_dynamic_work_compiles(tmp_path, arch, d, g, dt, parts, stages):
    """DecodeConfig.work "dynamic": the per-head work counter (relaxed atomic adds, one per item, by lane 0), the
    acquire-release finished-CTA count whose last CTA resets the pair, the FP16 work-list and flag loads, and no
    spills on either arch."""
    dec, _ = _compile(tmp_path, arch, d, 2, g, dt, "bits", parts, stages, "pre", 0, "dynamic")
    text = dec.read_text()
    assert text.count("atom.relaxed.gpu.global.add.u32") == 1  # the loop's grab (the first two items are static)
    assert "atom.acq_rel.gpu.global.add.u32" in text
    assert text.count("st.relaxed.gpu.global.u32") == 2
    assert "ld.global.u8" in text and "cp.async.cg.shared.global" in text
    assert re.search(rf"cp\.async\.wait_group\s+{stages - 1};", text)
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas not on PATH")
    out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", str(dec), "-o", os.devnull], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", out.stdout + out.stderr), out.stdout


@pytest.mark.compile
@pytest.mark.parametrize("arch", [90, 120])
def test_query_prequantizer_compiles(tmp_path, arch):
    """thrift_decode's query quantizer (decode_interface._query_quantizer: the prefill quantizer, with_dq, TVM FFI)
    compiles with fake tensors, with the Hadamard shuffles and the mse SSE in its PTX and 0 spills."""
    dump = tmp_path / "dump"
    dump.mkdir()
    env = dict(os.environ, CUTE_DSL_ARCH=f"sm_{arch}a", CUTE_DSL_KEEP="ptx,cubin", CUTE_DSL_DUMP_DIR=str(dump))
    code = (f"import sys, torch; sys.path.insert(0, {ROOT!r}); import kernels.decode_interface as di; "
            f"di._query_quantizer(128, torch.bfloat16, {arch}, True, 'mse')")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    ptx = [p for p in dump.iterdir() if p.suffix == ".ptx"]
    assert len(ptx) == 1, ptx
    text = ptx[0].read_text()
    assert "shfl.sync.bfly" in text and "mul.rn.f32 mse_e, mse_e, mse_e;" in text
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas not on PATH")
    out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", str(ptx[0]), "-o", os.devnull], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", out.stdout + out.stderr)
