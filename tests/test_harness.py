"""CPU tests of the benchmark harness and the static resource report (issue 5).

CLI parsing and --help, table/JSON/CSV writing, baseline discovery with reasons on a CPU machine, roofline
arithmetic against brute force, NVTX labels, the heatmap on a tiny input, and (marked compile) the static
report compiling a real kernel for sm_120a and sm_90a with fake tensors.
"""
import argparse
import csv
import json
import math
import os
import random

import pytest

from harness import baselines as bl
from harness import bench, report, roofline
from profiling import nvtx_ranges


def _parser():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_help_lists_every_option(capsys):
    from harness.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--prefill", "--decode", "--budgets", "--variants", "--timer", "--ceilings", "--profile",
                 "--config", "--dry-run", "L2 flushed"):
        assert flag in out


def test_cli_shapes_from_flags_and_config(tmp_path):
    args = _parser().parse_args(["--prefill", "2,1000,1000,16,4,64", "--decode", "4,1,5000,16,4,64",
                                 "--budgets", "0,0.1", "--no-causal"])
    probs = bench.build_problems(args)
    assert [(p.mode, p.b, p.sq, p.skv, p.hq, p.hkv, p.d, p.causal) for p in probs] == [
        ("prefill", 2, 1000, 1000, 16, 4, 64, False), ("decode", 4, 1, 5000, 16, 4, 64, False)]
    assert args.budgets == [0.0, 0.1]

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"prefill": [[1, 300, 300, 8, 8, 128]], "budgets": [0.05], "dtype": "fp16"}))
    args = _parser().parse_args(["--config", str(cfg), "--mode", "prefill"])
    probs = bench.build_problems(args)
    assert [(p.sq, p.dtype) for p in probs] == [(300, "fp16")] and args.budgets == [0.05]

    # default sweep: both modes
    args = _parser().parse_args(["--seqlens", "128,256", "--decode-seqlens", "1024"])
    probs = bench.build_problems(args)
    assert [(p.mode, p.sq, p.skv) for p in probs] == [("prefill", 128, 128), ("prefill", 256, 256),
                                                      ("decode", 1, 1024)]


def test_cli_rejects_bad_input():
    with pytest.raises(SystemExit):
        _parser().parse_args(["--prefill", "1,2,3"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--budgets", "a,b"])
    with pytest.raises(ValueError, match="hq"):
        bl.Problem("prefill", 1, 64, 64, 6, 4, 64)
    with pytest.raises(ValueError, match="mode"):
        bl.Problem("train", 1, 64, 64, 4, 4, 64)


def test_dry_run_writes_report_without_gpu(tmp_path, capsys):
    from harness.__main__ import main

    out = tmp_path / "res"
    rc = main(["bench", "--dry-run", "--seqlens", "256", "--decode-seqlens", "512", "--budgets", "0,0.05",
               "--out", str(out)])
    assert rc == 0
    rows = report.load_rows(str(out / "results.json"))
    names = {r["variant"] for r in rows}
    assert {"fa2-sdpa", "cudnn-sdpa", "fa4-cute", "sage", "thrift-fp4only", "thrift-f0.05"} <= names
    assert all(r["status"] == "skip" for r in rows)
    # thrift prefill variants only on prefill rows, decode ones only on decode rows
    assert all(r["mode"] == "prefill" for r in rows if r["variant"].startswith("thrift-f"))
    assert all(r["mode"] == "decode" for r in rows if r["variant"].startswith("thrift-decode"))
    assert (out / "results.csv").exists() and (out / "table.txt").exists()


def test_bench_pipeline_end_to_end_on_cpu(tmp_path):
    """--device cpu runs the real measurement path (inputs, fp32 reference, prepare, timing, roofline, report)
    with torch SDPA and the thrift reference, on a tiny non-multiple-of-64 shape."""
    pytest.importorskip("kernels.reference")
    from harness.__main__ import main

    out = tmp_path / "cpu"
    rc = main(["bench", "--device", "cpu", "--prefill", "1,100,100,2,1,32", "--mode", "prefill",
               "--budgets", "0.5", "--rep", "2", "--warmup", "0", "--rotate", "2", "--out", str(out), "--no-plots"])
    assert rc == 0
    rows = {r["variant"]: r for r in report.load_rows(str(out / "results.json"))}
    assert set(rows) == {"sdpa-math", "thrift-ref-f0.5"}
    for r in rows.values():
        assert r["status"] == "ok" and r["ms"] > 0 and r["n_timed"] == 2 and r["floor_ms"] > 0
    assert rows["sdpa-math"]["rel_l2"] < 1e-2            # bf16 output rounding only
    assert 1e-3 < rows["thrift-ref-f0.5"]["rel_l2"] < 0.5  # FP4 on half the blocks


def test_workload_inputs_shapes():
    p = bl.Problem("decode", 2, 1, 130, 4, 2, 32)
    sets = bench._make_inputs(p, 2, seed=5, device="cpu", kind="workload")
    assert len(sets) == 2
    q, k, v = sets[0]
    assert q.shape == (2, 1, 4, 32) and k.shape == v.shape == (2, 130, 2, 32) and q.dtype == p.torch_dtype()
    assert not (sets[0][1] == sets[1][1]).all()  # rotated sets differ
    with pytest.raises(ValueError, match="inputs"):
        bench._make_inputs(p, 1, seed=0, device="cpu", kind="zeros")


# ----------------------------------------------------------------------------------------------- discovery

def test_discovery_gives_a_reason_for_every_skip():
    import torch

    variants, skipped = bl.discover(budgets=(0.0, 0.05), verbose=False)
    if torch.cuda.is_available():
        pytest.skip("discovery reasons are checked on CPU machines")
    assert variants == []
    names = [s.name for s in skipped]
    for n in ("fa2-sdpa", "cudnn-sdpa", "fa4-cute", "fa2-pkg", "sage3", "sage", "thrift-fp4only", "thrift-f0.05"):
        assert n in names, n
    for s in skipped:
        assert isinstance(s.reason, str) and len(s.reason) > 5, s
    # include filter keeps only the named prefixes
    _, sk = bl.discover(budgets=(0.05,), include=["fa4", "thrift-f"], verbose=False)
    assert {s.name for s in sk} == {"fa4-cute", "thrift-f0.05"}


def test_sdpa_causal_alignment_rules():
    assert bl._sdpa_causal_flag(bl.Problem("prefill", 1, 128, 128, 4, 4, 64)) is True
    assert bl._sdpa_causal_flag(bl.Problem("decode", 1, 1, 4096, 4, 4, 64)) is False
    with pytest.raises(bl.Unsupported):
        bl._sdpa_causal_flag(bl.Problem("prefill", 1, 100, 300, 4, 4, 64))


# ----------------------------------------------------------------------------------------------- report

def _rows():
    rows = []
    for sq in (1024, 2048):
        for name, fam, bud, ms, err in (("fa2-sdpa", "baseline", None, 1.0, 3e-3), ("thrift-f0.05", "thrift", 0.05,
                                                                                     0.7, 2e-2),
                                        ("thrift-fp4only", "thrift", 0.0, 0.5, 8e-2)):
            rows.append({"mode": "prefill", "shape": f"s{sq}", "sq": sq, "skv": sq, "variant": name, "family": fam,
                         "budget": bud, "status": "ok", "ms": ms * sq / 1024, "tflops": 100.0 + random.random(),
                         "rel_l2": err, "max_abs_err": 10 * err, "floor_ms": 0.3, "x_floor": ms / 0.3,
                         "speedup_vs_fa2": 1.0 / ms})
    rows.append({"mode": "decode", "shape": "d", "sq": 1, "skv": 4096, "variant": "sage", "family": "baseline",
                 "status": "error", "note": "RuntimeError: boom", "ms": float("nan")})
    return report.rows_from(rows)


def test_table_json_csv_roundtrip(tmp_path):
    rows = _rows()
    files = report.write_all(rows, str(tmp_path), {"device": "cpu-test"}, plots=False, echo=False)
    table = open(files["table"]).read().splitlines()
    assert table[0].split()[:3] == ["mode", "shape", "variant"] and len(table) == 2 + len(rows)
    assert "error" in table[-1] and "nan" in table[-1]
    data = json.load(open(files["json"]))
    assert data["meta"]["device"] == "cpu-test" and len(data["rows"]) == len(rows)
    assert data["rows"][-1]["ms"] is None  # NaN -> null
    with open(files["csv"]) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) and list(got[0].keys()) == report.ROW_FIELDS
    assert float(got[1]["rel_l2"]) == pytest.approx(2e-2)


def test_merge_recomputes_speedups(tmp_path):
    rows = _rows()
    base = [r for r in rows if r["family"] == "baseline"]
    thr = [dict(r, speedup_vs_fa2=None) for r in rows if r["family"] == "thrift"]
    report.write_json(str(tmp_path / "a.json"), base)
    report.write_json(str(tmp_path / "b.json"), thr)
    report.merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")], str(tmp_path / "m"), plots=False)
    merged = report.load_rows(str(tmp_path / "m" / "results.json"))
    assert len(merged) == len(rows)
    for r in merged:
        if r["variant"] == "thrift-f0.05":
            assert r["speedup_vs_fa2"] == pytest.approx(1.0 / 0.7)
    with pytest.raises(ValueError, match="paths"):
        report.merge([str(tmp_path / "nothing.json")], str(tmp_path / "x"), plots=False)


def test_plots_written_or_reason(tmp_path):
    files = report.write_all(_rows(), str(tmp_path), plots=True, echo=False)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "speed_png" not in files
        return
    for key in ("speed_png", "pareto_png"):
        assert os.path.getsize(files[key]) > 1000


def test_results_dir_is_utc_timestamped(tmp_path):
    d = report.results_dir(str(tmp_path))
    name = os.path.basename(d)
    assert os.path.isdir(d) and len(name) == 16 and name.endswith("Z") and name[8] == "T"


# ----------------------------------------------------------------------------------------------- roofline

@pytest.mark.parametrize("sq,skv", [(1, 1), (7, 7), (64, 200), (200, 64), (1, 5000), (333, 333)])
def test_visible_pairs_matches_brute_force(sq, skv):
    brute = sum(1 for i in range(sq) for j in range(skv) if j <= i + skv - sq)
    assert roofline.visible_pairs(sq, skv, True) == brute
    assert roofline.visible_pairs(sq, skv, False) == sq * skv


def test_roofline_arithmetic():
    c = roofline.Ceilings("t", bandwidth_gbs=1000.0, bf16_tflops=100.0, fp4_tflops=400.0, source="test")
    fl = roofline.attention_flops(1, 1024, 1024, 8, 128, causal=False)
    assert fl == 4 * 1024 * 1024 * 8 * 128
    by = roofline.attention_bytes(1, 1024, 1024, 8, 2, 128)
    assert by == 2 * 2 * (1024 * 8 * 128) + 2 * 2 * (1024 * 2 * 128)
    r = roofline.floor_ms(fl, by, c)
    assert r["math_ms"] == pytest.approx(fl / 100e12 * 1e3) and r["bound"] == "math"
    r4 = roofline.floor_ms(fl, by, c, fp16_fraction=0.0)
    assert r4["math_ms"] == pytest.approx(fl / 400e12 * 1e3)
    assert roofline.floor_ms(fl, 1e12, c)["bound"] == "memory"
    # no FP4 MMA (SM90): the FP4 share runs at the bf16 rate
    c90 = roofline.Ceilings("h", 3000.0, 800.0, None, "t")
    assert roofline.floor_ms(fl, by, c90, fp16_fraction=0.0)["math_ms"] == pytest.approx(fl / 800e12 * 1e3)
    with pytest.raises(ValueError, match="fp16_fraction"):
        roofline.floor_ms(fl, by, c, fp16_fraction=1.5)
    assert roofline.fp16_fraction_for_budget(4, 4, 0, True) == 0.0
    assert roofline.fp16_fraction_for_budget(4, 4, 4, True) == 1.0
    assert roofline.fp16_fraction_for_budget(4, 4, 1, True) == pytest.approx(4 / 10)
    assert roofline.ratio(2.0, 0.5) == 4.0 and math.isnan(roofline.ratio(float("nan"), 1.0))
    assert roofline.datasheet("rtx-5090").bandwidth_gbs == 1792.0
    with pytest.raises(ValueError, match="name"):
        roofline.datasheet("gtx-480")


# ----------------------------------------------------------------------------------------------- numerics / nvtx

def test_fp32_reference_matches_exact_attention(rng_seed):
    import torch

    attention_exact = pytest.importorskip("kernels.reference").attention_exact

    g = torch.Generator().manual_seed(rng_seed)
    for causal, (sq, skv) in ((True, (70, 130)), (False, (33, 33)), (True, (1, 90))):
        q = torch.randn(2, sq, 4, 32, generator=g).bfloat16()
        k = torch.randn(2, skv, 2, 32, generator=g).bfloat16()
        v = torch.randn(2, skv, 2, 32, generator=g).bfloat16()
        ref = attention_exact(q, k, v, causal=causal)
        out = bench.reference_fp32(q, k, v, causal, max_elems=2000)  # several row chunks
        e = bench.errors(out, ref.float())
        assert e["rel_l2"] < 1e-5, (causal, sq, skv, e)


def test_errors_flags_nan():
    import torch

    ref = torch.ones(4, 4)
    out = ref.clone()
    out[0, 0] = float("nan")
    assert math.isnan(bench.errors(out, ref)["rel_l2"])


def test_nvtx_labels_and_noop_ranges():
    tag = nvtx_ranges.shape_tag(1, 4096, 4096, 32, 8, 128, causal=True)
    assert tag == "b1_sq4096_skv4096_h32_kv8_d128_c"
    assert nvtx_ranges.label("thrift-f0.05", "attention", tag) == f"thrift-f0.05/attention/{tag}"
    with nvtx_ranges.variant_scope("fa2/sdpa", shape=tag):
        assert nvtx_ranges.current_label("quantize") == f"fa2_sdpa/quantize/{tag}"
        with nvtx_ranges.phase("attention"):
            pass

    @nvtx_ranges.annotate("select")
    def f(x):
        return x + 1

    assert f(1) == 2
    assert nvtx_ranges.current_label("select") == "thrift/select"  # defaults outside any scope
    assert nvtx_ranges.backend_name() in ("nvtx", "torch.cuda.nvtx", "none")


def test_nvtx_nesting_matches_ncu_paths(monkeypatch):
    """variant > phase > shape are separate nested push/pop ranges (what ncu's "A/B/C/" filter matches)."""
    events = []
    monkeypatch.setattr(nvtx_ranges, "_backend", ("test", lambda n: events.append(("push", n)),
                                                  lambda: events.append(("pop",))))
    with nvtx_ranges.variant_scope("thrift-f0.05", shape="b1_sq64"):
        with nvtx_ranges.phase("quantize"):
            events.append(("kernel",))
        with nvtx_ranges.phase("attention"):
            events.append(("kernel",))
    assert events == [("push", "thrift-f0.05"), ("push", "quantize"), ("push", "b1_sq64"), ("kernel",), ("pop",),
                      ("pop",), ("push", "attention"), ("push", "b1_sq64"), ("kernel",), ("pop",), ("pop",),
                      ("pop",)]
    events.clear()
    with nvtx_ranges.phase("select"):  # no scope: the default variant is pushed too
        pass
    assert [e[1] for e in events if e[0] == "push"] == ["thrift", "select"]


def test_heatmap_tiny(tmp_path):
    from harness.__main__ import main

    # the built-in structured workload at a tiny size (200 tokens: 4 blocks, the last one partial)
    rc = main(["heatmap", "--seq-len", "200", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
               "--workload", "builtin", "--budget", "0.3", "--out", str(tmp_path)])
    assert rc == 0
    import numpy as np

    e = np.load(tmp_path / "heatmap.npy")
    assert e.shape == (4, 4)
    assert np.isnan(e[0, 1:]).all() and np.isfinite(np.diag(e)).all()  # causal: upper triangle masked
    assert (e[np.isfinite(e)] > 0).all()
    meta = json.load(open(tmp_path / "heatmap.json"))["meta"]
    try:
        import kernels.selection  # noqa: F401
    except ImportError:
        return  # selection not in this checkout: nothing marked
    assert 0.0 < meta["selected_error_share"] <= 1.0


def test_heatmap_error_vanishes_without_quantization_noise():
    """Inputs exactly representable in FP4 (q, k, v in E2M1 values with unit scales) and one key per row:
    the only error left is P's two-level quantization, which is exact for a single 1.0 per tile."""
    import torch

    from harness.heatmap import block_contribution_error

    s, d = 64, 16
    q = torch.zeros(s, d)
    k = torch.zeros(s, d)
    v = torch.full((s, d), 6.0)
    err = block_contribution_error(q.half(), k.half(), v.half(), causal=False)
    # uniform P over 64 keys: P~ = 1 everywhere, quantizes exactly; V = 6 -> scale 1, code 6: exact in NVFP4
    assert err.shape == (1, 1) and err.item() < 1e-6
    # V = 2 is not exact (scale e4m3(2/6) = 0.34375, 2 -> 6 * 0.34375 = 2.0625): the error shows up
    err2 = block_contribution_error(q.half(), k.half(), torch.full((s, d), 2.0).half(), causal=False)
    assert err2.item() == pytest.approx(0.0625 * math.sqrt(s * d), rel=1e-6)


# ----------------------------------------------------------------------------------------------- static report

def test_occupancy_arithmetic():
    from profiling.resources import ctas_per_sm, limits_for

    # 128 threads, 68 regs: 68*32 = 2176 -> 2304 per warp -> 28 warps -> 7 CTAs (regs limit) on both archs
    r = ctas_per_sm("sm_120a", 68, 128, 8192)
    assert r["ctas_per_sm"] == 7 and r["limiter"] == "regs"
    # smem: 40 KB + 1 KB reserved per CTA -> 2 CTAs on SM120 (100 KB), 5 on SM90 (228 KB)
    assert ctas_per_sm("sm_120a", 32, 128, 40 * 1024)["ctas_per_sm"] == 2
    assert ctas_per_sm("sm_90a", 32, 128, 40 * 1024)["ctas_per_sm"] == 5
    # over the per-CTA maximum -> does not launch
    assert ctas_per_sm("sm_120a", 32, 128, 100 * 1024)["ctas_per_sm"] == 0
    # warps: 48 per SM on SM120, 64 on SM90
    assert ctas_per_sm("sm_120a", 16, 512, 0)["by_warps"] == 3
    assert ctas_per_sm("sm_90a", 16, 512, 0)["by_warps"] == 4
    assert limits_for("sm_120a")["smem_per_cta"] == 99 * 1024
    with pytest.raises(ValueError, match="arch"):
        limits_for("sm_75")


def test_ptx_and_ptxas_parsers():
    from profiling.resources import mma_mix, parse_ptxas, split_ptx_entries, threads_from_ptx

    ptx = """.visible .entry k_a(
.param .u64 p
)
.reqntid 128, 1, 1
{
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};
\t@%p1 mma.sync.aligned.kind::mxf4nvf4.block_scale.scale_vec::4X.m16n8k64.row.col.f32.e2m1.e2m1.f32.ue4m3 {%f1};
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};
}
.visible .entry k_b(
)
.maxntid 256, 1, 1
{
\tret;
}
"""
    ents = split_ptx_entries(ptx)
    assert list(ents) == ["k_a", "k_b"]
    assert mma_mix(ents["k_a"]) == {
        "mma.sync.aligned.kind::mxf4nvf4.block_scale.scale_vec::4X.m16n8k64.row.col.f32.e2m1.e2m1.f32.ue4m3": 1,
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32": 2}
    assert mma_mix(ents["k_b"]) == {}
    assert threads_from_ptx(ents["k_a"]) == 128 and threads_from_ptx(ents["k_b"]) == 256
    rep = """ptxas info    : Compiling entry function 'k_a' for 'sm_120a'
ptxas info    : Function properties for k_a
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 512 bytes smem, 400 bytes cmem[0]
"""
    st = parse_ptxas(rep)["k_a"]
    assert st == {"registers": 168, "spill_stores": 8, "spill_loads": 4, "stack_bytes": 16, "smem_static": 512,
                  "barriers": 1}


@pytest.mark.compile
def test_static_report_compiles_for_both_archs():
    """The real thing: compile the demo kernel, the project's quantizer and decode kernels (and the SM120 FP4 tile)
    for sm_120a and sm_90a in subprocesses, run ptxas on the PTX, and read registers, smem and the MMA mix.
    (The fused prefill takes minutes to compile; tests/test_prefill_compile.py covers it.)"""
    from profiling.resources import collect, format_rows

    rows = collect(("sm_120a", "sm_90a"), kernels=["demo_gemm", "fp4_tile_sm120", "quant", "decode"],
                   schedules=["t64", "d128_nvfp4", "d128_bf16", "d128_kv8_g4"])
    text = format_rows(rows)
    print(text)
    ok = [r for r in rows if r["status"] == "ok"]
    for arch in ("sm_120a", "sm_90a"):
        demo = [r for r in ok if r["arch"] == arch and r["kernel"] == "demo_gemm"]
        assert len(demo) == 1, text
        r = demo[0]
        assert 16 <= r["registers"] <= 255 and r["threads"] == 128
        assert r["smem_dynamic"] == 2 * 64 * 32 * 2  # sA + sB fp16 slabs
        assert r["mma_mix"] == {"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32": 16}
        assert r["ctas_per_sm"] >= 1 and r["limiter"] in ("regs", "smem", "warps", "cta_cap")
    # the project's own kernels (quantizer, split-KV decode + combine) on both archs
    for arch in ("sm_120a", "sm_90a"):
        for kern in ("quant", "decode"):
            got = [r for r in ok if r["arch"] == arch and r["kernel"] == kern]
            assert got, f"{kern} did not compile for {arch}:\n{text}"
            for r in got:
                assert r["registers"] > 0 and r["threads"] > 0 and r["spill_stores"] is not None
                assert r["ctas_per_sm"] >= 1
        dec_mma = [k for r in ok if r["arch"] == arch and r["kernel"] == "decode" for k in r["mma_mix"]]
        assert any(k.startswith("mma.sync.aligned.m16n8k16") for k in dec_mma), text
    tile = [r for r in ok if r["kernel"] == "fp4_tile_sm120"]
    if tile:  # SM120 block-scaled MMA shows up in the mix
        assert tile[0]["arch"] == "sm_120a"
        assert any("kind::mxf4nvf4.block_scale" in k for k in tile[0]["mma_mix"])
