"""CPU compile tests of the fused prefill (no GPU): every shipped schedule compiles for sm_90a and sm_120a
with fake tensors, ptxas reports 0 spill bytes, and the sm_120a PTX carries the block-scaled FP4 MMA
(kind::mxf4nvf4.block_scale) next to the 16-bit m16n8k16 MMA of the FP16 phase; the sm_90a wgmma schedules carry
the warpgroup MMAs (QK^T from shared memory, P.V with P in registers) and the async-proxy fence, and no mma.sync.

Each arch compiles in a subprocess (the DSL reads CUTE_DSL_ARCH at import).  Budget per arch: 3 prefill kernels,
the selection's top-k kernel (kernels/select_topk.py) and the quantizer (with and without the Hadamard rotation;
scale_rule "mse" -- the default -- and "amax").
The "mse" quantizers' PTX must carry the rule's squared error as explicit mul.rn / add.rn pairs (never an FMA):
16 per candidate scale per group, 5 inlined group quantizations (1 Q/K item + 4 V groups).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest

pytestmark = pytest.mark.compile
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import json, os, sys, glob
    sys.path.insert(0, {root!r})
    import cutlass
    from kernels.prefill import compile_prefill
    from kernels.schedules import SCHEDULES
    from quant.quant_kernel import compile_quant
    arch = int("".join(ch for ch in {arch!r} if ch.isdigit()))
    out = {{}}
    dump = os.environ["CUTE_DSL_DUMP_DIR"]

    def save(compiled, name):
        ptx = compiled.artifacts.PTX
        if not os.path.exists(str(ptx)[:4096]):  # the PTX text itself
            path = os.path.join(dump, name + ".ptx")
            open(path, "w").write(ptx)
            return path
        return ptx
    for i, (name, sch) in enumerate(sorted(SCHEDULES.items())):
        # vary dtype / head_dim / causal across the schedules to cover the variants within the budget
        dt = cutlass.Float16 if i % 2 == 0 else cutlass.BFloat16
        D = 128 if i != 1 else 64
        out[name] = save(compile_prefill(dt, D, i != 2, sch, arch), name)
    out["quant"] = save(compile_quant(cutlass.BFloat16, 128, True), "quant")  # with the dq(K)/dq(V) outputs
    # Hadamard rotation of Q/K (qk_rotation="hadamard", the default): D=128 with dq (3 shuffle stages), D=64 without
    out["quant_rot"] = save(compile_quant(cutlass.BFloat16, 128, True, True), "quant_rot")
    # (with the Q block means, D=64)
    out["quant_rot64"] = save(compile_quant(cutlass.Float16, 64, False, True, with_qmean=True), "quant_rot64")
    # the standard amax scale rule (scale_rule="amax"; the others use the default "mse")
    out["quant_amax"] = save(compile_quant(cutlass.BFloat16, 128, False, True, "amax"), "quant_amax")
    # the SM90 prefill's "bits" code-word order (kernels.prefill.fp4_word_layout)
    # ... with the Q block means too (with_qmean: what the public op compiles with SELECT_FUSED_MEANS)
    out["quant_bits"] = save(compile_quant(cutlass.Float16, 128, False, True, "mse", "bits", True), "quant_bits")
    # the public op's top-k + bitmask of the block selection (kernels/select_topk.py)
    from kernels.select_topk import compile_topk
    out["select_topk"] = save(compile_topk(True), "select_topk")
    print("RESULT" + json.dumps(out))
""")


def _compile_arch(arch, tmp_path):
    dump = tmp_path / arch
    dump.mkdir()
    env = dict(os.environ, CUTE_DSL_ARCH=arch, CUTE_DSL_KEEP="ptx", CUTE_DSL_DUMP_DIR=str(dump), PYTHONPATH=ROOT,
               CUTE_DSL_DISABLE_FILE_CACHING="1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=ROOT, arch=arch)], env=env, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _ptxas(arch, ptx):
    exe = shutil.which("ptxas") or "/usr/local/bin/ptxas"
    if not os.path.exists(exe):
        pytest.skip("ptxas not found")
    r = subprocess.run([exe, f"-arch={arch}", "-v", ptx, "-o", os.devnull], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr)]
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", r.stderr)]
    return spills, regs


@pytest.mark.parametrize("arch", ["sm_90a", "sm_120a"])
def test_prefill_compiles_no_spills(arch, tmp_path):
    from kernels.prefill import fp4_word_layout
    from kernels.schedules import SCHEDULES

    ptx = _compile_arch(arch, tmp_path)
    assert set(SCHEDULES) <= set(ptx)
    for name, path in ptx.items():
        text = open(path).read()
        spills, regs = _ptxas(arch, path)
        print(arch, name, "registers", regs, "spill bytes", spills)
        assert spills and all(s == 0 for s in spills), f"{arch} {name}: spills {spills}"
        if name == "select_topk":
            # a warp-wide int64 arg-max per round (5 butterfly steps, each two 32-bit shuffles), the NaN / -0 key
            # handling, the __syncwarp before the bitmask reads the row's indices back
            assert len(re.findall(r"shfl\.sync\.bfly\.b32", text)) == 10, name
            assert "setp.nan.f32" in text and "add.rn.f32 z, %" in text and "bar.warp.sync" in text, name
            # the score key sign-extended into the high word (the DSL's Int32 -> Int64 is cvt.u64.u32: negative
            # scores would rank first), then the signed 64-bit compares of the rounds
            assert "cvt.s64.s32 hi, u;" in text and "setp.lt.s64" in text and "max.s64" in text, name
            # NaN ranks one above +inf, below 0x7FFFFFFF: a NaN at block 0 would otherwise be the key INT64_MAX, the
            # first round's (exclusive) bound (tests/test_selection.py emulates the rounds with this constant)
            assert "selp.b32 u, 0x7F800001, u, isnan;" in text, name
            continue
        if name.startswith("quant"):
            # rotation: strides 16, 32 (, 64) by full-mask butterfly shuffles, 16 values each; none without it
            n_shfl = len(re.findall(r"shfl\.sync\.bfly\.b32\s+%r\d+, %r\d+, \d+, 31, -1;", text))
            want = {"quant": 0, "quant_rot": 16 * 3, "quant_rot64": 16 * 2, "quant_amax": 16 * 3,
                    "quant_bits": 16 * 3}[name]
            assert n_shfl == want, f"{name}: {n_shfl} shuffles, expected {want}"
            # "mse" scale rule: the per-element SSE step e*e then acc + e, both explicitly rounded (no contraction)
            from quant.nvfp4 import MSE_SCALE_STEPS

            n_sse = len(re.findall(r"mul\.rn\.f32 mse_e, mse_e, mse_e;\s*add\.rn\.f32 mse_acc, mse_acc, mse_e;", text))
            want_sse = 0 if name == "quant_amax" else 5 * 16 * (1 + len(MSE_SCALE_STEPS))
            assert n_sse == want_sse, f"{name}: {n_sse} SSE steps, expected {want_sse}"
            # no FMA in the codec's numerics except the exact ones: inside the true divisions and the squared error's
            # |x| - m*s (arch_paths.div16 / _sse16_ptx: dv_ registers), the rotation's +-1 * a + b (rot_ registers)
            fmas = [ln for ln in text.splitlines() if "fma" in ln]
            assert fmas and all("dv_" in ln or "rot_" in ln for ln in fmas), f"{name}: an FMA outside the divisions"
            assert any("rot_" in ln for ln in fmas) == (n_shfl > 0), f"{name}: rotation FMAs without a rotation"
            # div.rn only for amax / 6 (5 groups) and the K (and Q) block mean: none per element (one reciprocal per
            # group)
            qmean = name in ("quant_bits", "quant_rot64")
            assert len(re.findall(r"div\.rn\.f32", text)) == 6 + qmean, f"{name}: per-element div.rn left"
            # the block means: 64 explicitly rounded adds in token order per mean (kernels.selection.block_means' bits)
            n_bm = len(re.findall(r"add\.rn\.f32 bm_s, ", text))
            assert n_bm == 64 * (1 + qmean), f"{name}: {n_bm} block-mean adds, expected {64 * (1 + qmean)}"
            # IEEE fp32 butterflies (no flush to zero), as torch computes them
            assert not re.search(r"(add|sub|mul)(\.rn)?\.ftz\.f32", text), name
            continue
        # phase-1 decode: shift-and-mask of "bits" code words where it decodes to fp16, else the prmt tables
        i_sch = sorted(SCHEDULES).index(name)  # the script's dtype choice: bf16 for odd indices
        arch_num = int("".join(ch for ch in arch if ch.isdigit()))
        bits = fp4_word_layout(SCHEDULES[name], arch_num, i_sch % 2 == 1) == "bits"
        assert ("0x8E008E00" in text) == bits, f"{arch} {name}: bits decode expected {bits}"
        if bits:
            assert "0x3E3C3800" not in text and "0x3F3F3F00" not in text, f"{name}: table decode left in"
        if arch == "sm_90a" and name == "m64_wg_s2_f1":
            # bf16, D=128, causal (i = its sorted index, odd): <= 168 registers keeps 3 CTAs of 128 threads per SM
            assert max(regs) <= 168, f"{name}: {regs} registers -> fewer than 3 CTAs per SM on sm_90a"
        if arch == "sm_90a" and SCHEDULES[name].uses_ws(90):
            # 1 + n warpgroups: setmaxnreg.inc blocks until the producer's setmaxnreg.dec freed enough of the CTA's
            # registers, so producer + n consumers must fit (1 + n) x the entry count ptxas gives (else: a hang)
            sch = SCHEDULES[name]
            n = sch.consumers
            dec = [int(x) for x in re.findall(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+);", text)]
            inc = [int(x) for x in re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+);", text)]
            assert dec == [sch.producer_regs] and inc == [sch.consumer_regs], (name, dec, inc)
            assert f".reqntid {sch.ws_threads}, 1, 1" in text, name
            assert max(regs) <= sch.entry_regs, (name, regs)
            assert dec[0] + n * inc[0] <= (1 + n) * max(regs), f"{name}: setmaxnreg {dec}/{inc} exceeds {1 + n} x {regs}"
            assert "mbarrier.try_wait.parity" in text, f"{name}: no mbarrier handshake"
        if arch == "sm_90a" and SCHEDULES[name].uses_wgmma(90):
            # one warpgroup: S = QK^T as m64n64k16 (both operands from smem), O += PV as m64n{D}k16; no mma.sync
            assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n64k16\.f32\.(f16|bf16)\.(f16|bf16)", text), name
            # P.V: A = P from registers (a 4-register list after the accumulators), B = a V descriptor
            assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n(64|128)k16\.f32\.(f16|bf16)\.(f16|bf16) "
                             r"\{[^}]*\}, \{%r\d+, %r\d+, %r\d+, %r\d+\}, %rd\d+", text), name
            assert "fence.proxy.async.shared::cta" in text, f"{name}: no async-proxy fence before the wgmma reads"
            assert "mma.sync" not in text, name
            continue
        assert re.search(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(f16|bf16)\.(f16|bf16)\.f32", text), name
        if arch == "sm_120a":
            assert "kind::mxf4nvf4.block_scale" in text, f"{name}: no block-scaled FP4 MMA in the sm_120a PTX"
        else:
            assert "block_scale" not in text


def test_schedules_validate():
    from kernels.schedules import SCHEDULES, PrefillSchedule, get_schedule

    for s in SCHEDULES.values():
        s.validate_for(128, 120)
        s.validate_for(64, 90)
    with pytest.raises(ValueError, match="tile_n"):
        PrefillSchedule(tile_n=128)
    with pytest.raises(ValueError, match="stages"):
        PrefillSchedule(stages=1)
    with pytest.raises(ValueError, match="unknown"):
        get_schedule("nope")
    with pytest.raises(TypeError):
        get_schedule(3)
    with pytest.raises(ValueError, match="warp_spec"):
        PrefillSchedule(mma="wgmma", warp_spec=True)  # fp16_stages=2
    with pytest.raises(ValueError, match="producer_regs"):
        PrefillSchedule(mma="wgmma", fp16_stages=1, warp_spec=True, producer_regs=100)
    with pytest.raises(ValueError, match="consumers"):
        PrefillSchedule(mma="wgmma", fp16_stages=1, warp_spec=True, consumers=4)
    with pytest.raises(ValueError, match="ring_stages"):
        PrefillSchedule(mma="wgmma", fp16_stages=1, warp_spec=True, ring_stages=7)
    ws3 = PrefillSchedule(mma="wgmma", fp16_stages=1, warp_spec=True, consumers=3, producer_regs=56)
    assert ws3.ws_ring == 3 and replace(ws3, ring_stages=4).ws_ring == 4
    with pytest.raises(ValueError, match="shared memory"):  # 6 ring stages of 32 KiB + 3 Q tiles > 227 KiB
        replace(ws3, ring_stages=6).validate_for(128, 90)
    with pytest.raises(ValueError, match="producer_regs"):
        PrefillSchedule(mma="wgmma", fp16_stages=1, warp_spec=True, consumers=3, producer_regs=136)
    # the consumers' setmaxnreg.inc only succeeds if producer + n consumers fit the CTA's (1 + n) x entry registers
    for n, entry in ((2, 168), (3, 128)):
        for p in range(24, entry + 1, 8):
            sch = PrefillSchedule(mma="wgmma", fp16_stages=1, warp_spec=True, consumers=n, producer_regs=p)
            total = (1 + n) * entry
            assert sch.entry_regs == entry and sch.ws_threads == 128 * (1 + n)
            assert sch.consumer_regs % 8 == 0 and p + n * sch.consumer_regs <= total < p + n * (sch.consumer_regs + 8)


def test_e2m1_magic_rounding_matches_codec():
    """kernels.arch_paths.e2m1_rne's algorithm (add/sub c = 2^22 * pow2(max(y, 1)) in fp32, min 6), emulated
    bit for bit in numpy, equals the codec's E2M1 RNE on every decision point, its fp32 neighbours and random y."""
    import numpy as np
    import torch

    from quant._fp4common import e2m1_decode, e2m1_encode

    pts = [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 2688]
    ys = []
    for p in pts:
        x = np.float32(p)
        ys += [x, np.nextafter(x, np.float32(0)), np.nextafter(x, np.float32(1e9))]
    ys = np.concatenate([np.array(ys, np.float32), np.random.rand(200000).astype(np.float32) * 7])
    c = ((np.maximum(ys, np.float32(1)).view(np.uint32) & np.uint32(0x7F800000)) + np.uint32(0x0B000000))
    c = c.view(np.float32)
    got = np.minimum((ys + c).astype(np.float32) - c, np.float32(6))
    ref = e2m1_decode(e2m1_encode(torch.from_numpy(ys))).numpy()
    assert np.array_equal(got, ref)



def test_quant_code_of_value_matches_codec():
    """quant/quant_kernel.py's code path: m = e2m1_rne(|y|) (the magic-number algorithm, emulated as above), code =
    (fp16 bits of m * 2^-14) >> 9 | sign bit of y, equals the codec's e2m1_encode(y) on every decision point, its fp32
    neighbours, both signs, zeros and random y (saturation included)."""
    import numpy as np
    import torch

    from quant._fp4common import e2m1_encode

    pts = [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 2688, 1e30]
    ys = []
    for p in pts:
        x = np.float32(p)
        ys += [x, np.nextafter(x, np.float32(0)), np.nextafter(x, np.float32(1e38))]
    ys = np.array(ys, np.float32)
    ys = np.concatenate([ys, -ys, np.random.randn(200000).astype(np.float32) * 3])
    a = np.abs(ys)
    c = ((np.maximum(a, np.float32(1)).view(np.uint32) & np.uint32(0x7F800000)) + np.uint32(0x0B000000))
    c = c.view(np.float32)
    m = np.minimum((a + c) - c, np.float32(6))  # fp32 arithmetic, each op rounded (e2m1_rne)
    h = (m * np.float32(2.0 ** -14)).astype(np.float16).view(np.uint16).astype(np.uint32)  # cvt.rn.f16.f32
    code = (h >> 9) | ((ys.view(np.uint32) >> 28) & 8)
    ref = e2m1_encode(torch.from_numpy(ys)).numpy().astype(np.uint32)
    assert np.array_equal(code, ref)


def test_mse_error_fma_is_exact():
    """kernels/arch_paths._sse16_ptx computes the squared error's |x| - m*s as one fma: the same value as the codec's
    fl(m*s) - |x| up to sign only if every product m*s of an E2M1 value and a positive E4M3 scale is exact in fp32 --
    checked for all of them -- and then fl(|x| - m*s) == -fl(m*s - |x|) for any |x| (round to nearest is symmetric),
    checked on fp16 / bf16 |x| around the products."""
    import numpy as np
    import torch

    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
    e4m3 = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy().astype(np.float64)
    prod = e2m1[:, None] * e4m3[None, :]
    assert np.array_equal(prod.astype(np.float32).astype(np.float64), prod)  # exact in fp32
    rng = np.random.default_rng(0)
    for dt in (torch.float16, torch.bfloat16):
        p = np.repeat(prod.ravel(), 8).astype(np.float32)
        x = torch.from_numpy(p * rng.uniform(0.5, 2.0, p.size).astype(np.float32)).to(dt).float().numpy()
        fma = (x.astype(np.float64) - p.astype(np.float64)).astype(np.float32)  # one rounding of the exact value
        codec = (p - x)  # fp32: fl(m*s) - |x|, one rounding
        assert np.array_equal(fma, -codec)


def test_p_quant_x22_and_packed_scale_match_codec():
    """The prefill's P' path: kernels.arch_paths.e2m1_rne_x22 (c = max(y22, 2^22) & exponent mask, fma(y22, 2^-22,
    c) - c, y22 = y * 2^22) then pack_p_sat_scale (16-bit min(., 6) * sc), emulated bit for bit in numpy, equals the
    codec's E2M1 RNE times sc on every decision point, its fp32 neighbours and random y, for fp16 and bf16."""
    import numpy as np
    import torch

    from quant._fp4common import e2m1_decode, e2m1_encode

    pts = [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 2688]
    ys = []
    for p in pts:
        x = np.float32(p)
        ys += [x, np.nextafter(x, np.float32(0)), np.nextafter(x, np.float32(1e9))]
    ys = np.concatenate([np.array(ys, np.float32), np.random.rand(200000).astype(np.float32) * 7,
                         np.float32(2.0) ** -np.random.randint(1, 140, 1000).astype(np.float32)])
    y22 = ys * np.float32(2.0 ** 22)  # exact (power of two)
    c = (np.maximum(y22, np.float32(2.0 ** 22)).view(np.uint32) & np.uint32(0x7F800000)).view(np.float32)
    # fma(y22, 2^-22, c) rounds y + c once; y22 * 2^-22 == ys exactly, so float64 sum -> float32 is that rounding
    r = ((y22.astype(np.float64) * 2.0 ** -22 + c.astype(np.float64)).astype(np.float32) - c).astype(np.float32)
    q = e2m1_decode(e2m1_encode(torch.from_numpy(ys)))
    assert np.array_equal(np.minimum(r, np.float32(6)), q.numpy())
    # packed: 16-bit conversion of r (exact), min 6, times an E4M3 scale: exact, so equal to the fp32 product
    scales = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every finite E4M3 > 0
    for dt in (torch.float16, torch.bfloat16):
        h = torch.from_numpy(r).to(dt).clamp(max=6.0)
        for sc in scales[:: 5].tolist() + [float(scales[-1])]:
            got = (h * torch.tensor(sc, dtype=dt)).float()
            assert torch.equal(got, q * sc), (dt, sc)

def test_smem_map_aliasing():
    from layouts.prefill import PrefillSmemMap

    for d in (64, 128):
        m = PrefillSmemMap(d, stages=2)
        # phase-2 V stage 0 overlaps FP4 stage 0; total fits sm_120
        assert m.fp16_v_off(0) <= m.fp4_stage_off(0) < m.fp16_v_off(0) + m.kv16
        assert m.total_bytes <= 99 * 1024


def test_import_without_cuda():
    import kernels

    assert "thrift_attention" in kernels.__all__


def test_schedule_string_round_trip():
    # the torch.library op carries the schedule as a string: every field must survive (a lost field silently ran
    # another schedule end to end)
    from kernels.schedules import SCHEDULES, PrefillSchedule, get_schedule, schedule_str

    cases = list(SCHEDULES.values()) + [PrefillSchedule(mma="wgmma", fp16_stages=1, min_ctas=2, mask_split=False)]
    for s in cases:
        for arch in (90, 120):
            assert get_schedule(schedule_str(s), arch=arch) == s, s


def test_schedule_overrides():
    from dataclasses import replace

    from kernels.schedules import SCHEDULES, default_schedule_name, get_schedule

    assert get_schedule("m64_w4_s2:stages=3;mask_split=False") == replace(SCHEDULES["m64_w4_s2"], stages=3,
                                                                           mask_split=False)
    assert get_schedule("wg2_ws_s2:producer_regs=56", arch=90) == replace(SCHEDULES["wg2_ws_s2"], producer_regs=56)
    assert get_schedule("stages=3", arch=90) == replace(SCHEDULES[default_schedule_name(90)], stages=3)
    assert get_schedule("stages=4", arch=120).stages == 4 and get_schedule("stages=4", arch=120).mma == "sync"
    for bad, word in (("m64_w4_s2:stagez=3", "stagez"), ("stages=x", "stages"), ("nope:stages=3", "nope"),
                      ("mask_split=maybe", "mask_split"), ("stages=9", "stages")):
        with pytest.raises(ValueError, match=word):
            get_schedule(bad, arch=90)


def test_default_schedule_per_arch():
    from kernels.schedules import SCHEDULES, default_schedule_name, get_schedule

    assert default_schedule_name(90) == "wg3_ws_s2" and SCHEDULES["wg3_ws_s2"].uses_ws(90)
    assert SCHEDULES["m64_wg_s2_f1"].uses_wgmma(90) and not SCHEDULES["m64_wg_s2_f1"].uses_ws(90)
    assert default_schedule_name(120) == "m64_w4_s2" and not get_schedule(None, arch=120).uses_wgmma(120)
    assert not SCHEDULES["m64_wg_s2_f1"].uses_wgmma(120)  # sm_120a ignores mma="wgmma" (and warp_spec)
    assert not SCHEDULES["wg2_ws_s2"].uses_wgmma(120) and not SCHEDULES["wg2_ws_s2"].uses_ws(120)


def test_schedule_helpers_trace_under_dynamo():
    # thrift_attention resolves and serializes the schedule outside its custom op, so torch.compile(fullgraph=True)
    # traces these helpers (dataclasses.fields of the class, not the instance, broke that once)
    import torch

    from kernels.schedules import get_schedule, schedule_str

    def f(x):
        return x + len(schedule_str(get_schedule(None, arch=90))) + len(schedule_str(get_schedule("stages=3", arch=90)))

    want = len(schedule_str(get_schedule(None, arch=90))) + len(schedule_str(get_schedule("stages=3", arch=90)))
    assert torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(1)).item() == want
