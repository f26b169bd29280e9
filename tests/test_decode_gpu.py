"""GPU tests of thrift_decode (kernels/decode.py) against the reference (kernels/decode_interface.thrift_decode_ref)."""
import pytest
import torch

pytestmark = pytest.mark.gpu

from kernels import decode_interface  # noqa: E402
from kernels.decode_interface import decode_fwd, plan_splits, select_decode_blocks, thrift_decode, thrift_decode_ref  # noqa: E402
from kernels.kv_cache import ThriftKVCache  # noqa: E402
from kernels.kv_cache import DEFAULT_FP4_LAYOUT, relayout_tiles as kv_relayout  # noqa: E402


def _build(lens, H, D, dtype, seed, k_scale=1.0, v_scale=1.0, fp4_layout=DEFAULT_FP4_LAYOUT):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, T = len(lens), max(lens)
    k = (torch.randn((B, T, H, D), generator=g, device="cuda") * k_scale).to(dtype)
    v = (torch.randn((B, T, H, D), generator=g, device="cuda") * v_scale).to(dtype)
    c = ThriftKVCache(B, H, D, capacity=64, dtype=dtype, device="cuda", fp4_layout=fp4_layout)
    c.append(k, v, num_new=lens)
    return c


def _poison():
    """Fill the caching allocator's free blocks with NaN so unwritten kernel outputs show up."""
    x = torch.full((1 << 26,), float("nan"), device="cuda")
    del x


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _check(c, HQ, budget, seed, schedule=None, q_scale=1.5, tol=2e-3):
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    q = (torch.randn((c.batch, 1, HQ, c.head_dim), generator=g, device="cuda") * q_scale).to(c.dtype)
    flags = select_decode_blocks(q, c, budget)
    _poison()
    out, lse = thrift_decode(q, c, budget=budget, return_lse=True, schedule=schedule, flags=flags)
    torch.cuda.synchronize()
    ref, lse_ref = thrift_decode_ref(q, c, return_lse=True, flags=flags)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = _rel(out, ref)
    lerr = (lse - lse_ref).abs().max().item()
    print(f"lens={c.lengths[:8]} HQ={HQ} D={c.head_dim} {c.dtype} budget={budget}: rel L2 {err:.2e}, max |dLSE| {lerr:.1e}")
    assert err <= tol, err
    assert lerr <= 2e-3, lerr
    return out


@pytest.mark.parametrize("L", [1, 63, 64, 65, 1000, 4097])
@pytest.mark.parametrize("budget", [0.0, 0.05, 1.0])
def test_b1_gqa_32_8(L, budget, rng_seed):
    c = _build([L], 8, 128, torch.float16, rng_seed)
    _check(c, 32, budget, rng_seed)


@pytest.mark.parametrize("budget", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("cfg", [(9, 3, 64, torch.bfloat16), (32, 8, 128, torch.float16), (32, 8, 128, torch.bfloat16)])
def test_batch8_ragged(cfg, budget, rng_seed):
    HQ, H, D, dtype = cfg
    c = _build([1, 70, 333, 1024, 5000, 64, 129, 2049], H, D, dtype, rng_seed)
    _check(c, HQ, budget, rng_seed)


def test_bf16_fp16_path_rounds_like_final_max(rng_seed):
    # budget 1: every tile on the FP16 path, spread over many splits, each with its own running max. The integer softmax
    # offset makes each split round P~ to bf16 as the reference does against the final max. H100, session 16: 9.5e-6
    # (2.8e-5 for the same shape in test_batch8_ragged); 1403b20's kernel and reference (offset = each split's running
    # max): 6.1e-4 here -- caught.
    c = _build([1, 70, 333, 1024, 5000, 64, 129, 2049], 8, 128, torch.bfloat16, rng_seed)
    _check(c, 32, 1.0, rng_seed, tol=1e-4)


@pytest.mark.parametrize("L,budget", [(131072, 0.0), (131072, 0.05), (131072, 1.0), (131071, 0.05)])
def test_long_131k(L, budget, rng_seed):
    c = _build([L], 8, 128, torch.float16, rng_seed)
    _check(c, 32, budget, rng_seed)


def test_group_16_and_schedules(rng_seed):
    c = _build([3000, 777], 2, 128, torch.float16, rng_seed)
    a = _check(c, 32, 0.05, rng_seed, schedule={"num_splits": 1})
    b = _check(c, 32, 0.05, rng_seed, schedule={"num_splits": 5})
    assert _rel(a, b) < 1e-3


def _run(c, q, budget, sched):
    flags = select_decode_blocks(q, c, budget)
    _poison()
    o, lse = thrift_decode(q, c, return_lse=True, flags=flags, schedule=sched)
    torch.cuda.synchronize()
    return o, lse


# the session-2 kernel: whole-tile double buffer, equal-count splits, FP16 loads one m-tile ahead
_OLD = {"parts": 1, "stages": 2, "f16_cost": 0, "f16_depth": 1, "work": "static"}
_STATIC = {"work": "static"}  # deterministic tile order per split (the dynamic default reorders the fp32 merge)


@pytest.mark.parametrize("D", [64, 128])
def test_pipeline_schedules_bit_identical(D, rng_seed):
    """The shared-memory pipeline (whole tiles or K/V halves, 2-4 ring slots), and the register cap (min_ctas) are pure
    scheduling: with the same tile ranges (f16_cost=0, the same split count) the output and LSE equal the
    whole-tile double-buffered kernel's bit for bit -- over 32-tile flag windows (one split of 80 tiles), selected
    and partial tiles, one-tile sequences and many splits."""
    c = _build([5100, 64 * 80, 999, 64], 8, D, torch.float16, rng_seed)
    g = torch.Generator(device="cuda").manual_seed(rng_seed + 1)
    q = (torch.randn((4, 1, 32, D), generator=g, device="cuda") * 1.5).half()
    for budget, split in ((0.05, {"num_splits": 1}), (0.25, {}), (0.0, {"num_splits": 7})):
        o0, l0 = _run(c, q, budget, dict(split, **_OLD))
        for var in ({"parts": 1, "stages": 3}, {"parts": 2, "stages": 3}, {"parts": 2, "stages": 4},
                    {"parts": 2, "stages": 3, "min_ctas": 15}, {"f16_depth": 1}):
            o1, l1 = _run(c, q, budget, dict(split, f16_cost=0, **var, **_STATIC))
            assert torch.equal(o0, o1) and torch.equal(l0, l1), (budget, split, var)
    _check(c, 32, 0.05, rng_seed, schedule={"parts": 2, "stages": 4, **_STATIC})
    with pytest.raises(ValueError, match="stages"):
        thrift_decode(q, c, schedule={"parts": 2, "stages": 2})
    with pytest.raises(ValueError, match="dynamic"):  # the dynamic work loop has one tile of look-ahead
        thrift_decode(q, c, schedule={"parts": 2, "stages": 4, "work": "dynamic"})


@pytest.mark.parametrize("f16_cost", [1, 3, 8])
def test_cost_balanced_splits(f16_cost, rng_seed):
    """Splits balanced by cost (each CTA finds its tile range from the flags) cover every tile exactly once: the
    output equals the equal-count splits' up to the fp32 rounding of the merge order (a lost or doubled 64-key tile
    would move O by ~1e-2 here), for 1, 5, 64 and 300 splits (more splits than tiles -> empty ranges), selected
    blocks, partial last blocks, sequences of 1 to 3 rounds of 512 tiles; and it matches the reference."""
    c = _build([64 * 1100 + 17, 64 * 80, 999, 64, 1], 2, 128, torch.float16, rng_seed)
    g = torch.Generator(device="cuda").manual_seed(rng_seed + 1)
    q = (torch.randn((5, 1, 8, 128), generator=g, device="cuda") * 1.5).half()
    for budget in (0.0, 0.05, 0.25, 1.0):
        for ns in (1, 5, 64, 300, 600):  # 600: 2 tiles per split, below BALANCE_MIN_TILES (equal counts)
            o0, l0 = _run(c, q, budget, dict(_OLD, num_splits=ns))
            o1, l1 = _run(c, q, budget, {"num_splits": ns, "f16_cost": f16_cost, **_STATIC})
            assert not o1.isnan().any()
            # O is rounded to fp16 after the merge: a few 1-ulp flips give ~1e-4; a lost tile moves LSE by ~1e-3
            err, dl = _rel(o1, o0), (l1 - l0).abs().max().item()
            assert err < 3e-4 and dl < 5e-5, (budget, ns, err, dl)
    _check(c, 8, 0.05, rng_seed, schedule={"f16_cost": f16_cost, "num_splits": 64, **_STATIC})


@pytest.mark.parametrize("pipe", [{"parts": 2, "stages": 3}, {"parts": 1, "stages": 2}])
def test_dynamic_work(pipe, rng_seed):
    """DecodeConfig.work "dynamic" (CTAs take items from a per-head atomic counter, the FP16 work list first) covers
    every tile exactly once: equal to the static equal-count splits up to the fp32 merge order (a lost or doubled
    tile moves O by ~1e-2 and LSE by ~1e-3 here) for 1 to 600 CTAs per head (more CTAs than items: some take none),
    selected and partial blocks, an empty and a one-token sequence; the counters reset themselves (three launches
    in a row, then another batch/head shape on the same stream, then the first again); and it matches the reference."""
    c = _build([64 * 1100 + 17, 64 * 80, 999, 64, 1, 0], 2, 128, torch.float16, rng_seed)
    g = torch.Generator(device="cuda").manual_seed(rng_seed + 1)
    q = (torch.randn((6, 1, 8, 128), generator=g, device="cuda") * 1.5).half()
    dyn = dict(pipe, work="dynamic")
    for budget in (0.0, 0.05, 0.25, 1.0):
        for ns in (1, 5, 64, 300, 600):
            o0, l0 = _run(c, q, budget, dict(_OLD, num_splits=ns, work="static"))
            for rep in range(3):
                o1, l1 = _run(c, q, budget, dict(dyn, num_splits=ns))
                assert not o1.isnan().any()
                err = _rel(o1[:5], o0[:5])
                dl = (l1[:5] - l0[:5]).abs().max().item()
                assert err < 3e-4 and dl < 5e-5, (budget, ns, rep, err, dl)
                assert torch.isneginf(l1[5]).all() and torch.isneginf(l0[5]).all()  # the empty sequence
    c2 = _build([3000, 777], 8, 64, torch.bfloat16, rng_seed)  # other B / Hkv / D on the same counter buffer
    _check(c2, 24, 0.05, rng_seed, schedule=dict(dyn, num_splits=3))
    c3 = _build([64 * 300 + 17, 999, 1], 2, 128, torch.float16, rng_seed)  # _check wants finite LSEs: no empty one
    _check(c3, 8, 0.05, rng_seed, schedule=dict(dyn, num_splits=64))
    _check(c3, 8, 0.25, rng_seed, schedule=dyn)


def test_dynamic_work_cuda_graph_replay(rng_seed):
    """The dynamic kernel's per-stream work counters under CUDA graph capture: the captured split kernel reuses the
    capture stream's counter buffer on every replay, which is only right if each launch leaves it zeroed (the last
    CTA of a head resets its pair). Five replays must match the eager call up to the merge order, also after the
    eager path ran other shapes on its own stream in between."""
    c = _build([64 * 700 + 5, 64 * 64], 8, 128, torch.bfloat16, rng_seed)
    g = torch.Generator(device="cuda").manual_seed(rng_seed + 1)
    q = (torch.randn((2, 1, 32, 128), generator=g, device="cuda") * 1.5).to(torch.bfloat16)
    flags, work = select_decode_blocks(q, c, 0.05, return_work=True)
    args = (q[:, 0].contiguous(), decode_interface.prequantize_query(q[:, 0].contiguous(), c.qk_rotation,
                                                                   c.scale_rule),
            c.tiles, c.k16, c.v16, flags, work, c.lengths_tensor(q.device), 128 ** -0.5)
    ns, tps = plan_splits(-(-c.max_length // 64), 2, 8, torch.cuda.get_device_properties(0).multi_processor_count)
    assert tps >= 4  # the dynamic default
    o_ref, l_ref = decode_fwd(*args, ns, tps, c.fp4_layout, "pre")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on the capture stream (compiles, allocates its counter buffer)
        decode_fwd(*args, ns, tps, c.fp4_layout, "pre")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):  # the warmed-up stream: capture records no memset of its counters
        o_g, l_g = decode_fwd(*args, ns, tps, c.fp4_layout, "pre")
    for rep in range(5):
        if rep == 2:  # other shapes through the eager path in between
            _check(_build([3000, 777], 2, 64, torch.float16, rng_seed), 8, 0.05, rng_seed)
        o_g.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(o_g, o_ref) < 4e-3 and (l_g - l_ref).abs().max().item() < 5e-5, rep


def test_decode_op_under_torch_compile(rng_seed):
    """thrift::decode_fwd (the custom op) traced by torch.compile(fullgraph=True) through its fake implementation:
    the compiled call gives the eager call's output and LSE (up to the dynamic kernel's merge order) and both match
    the reference."""
    c = _build([64 * 90 + 7, 300], 8, 128, torch.float16, rng_seed)
    g = torch.Generator(device="cuda").manual_seed(rng_seed + 1)
    q = (torch.randn((2, 1, 32, 128), generator=g, device="cuda") * 1.5).half()
    flags, work = select_decode_blocks(q, c, 0.05, return_work=True)
    q16 = q[:, 0].contiguous()
    q_rot = decode_interface.prequantize_query(q16, c.qk_rotation, c.scale_rule)
    lens = c.lengths_tensor(q.device)
    ns, tps = plan_splits(-(-c.max_length // 64), 2, 8, torch.cuda.get_device_properties(0).multi_processor_count)

    def f(q16, q_rot, tiles, k16, v16, flags, work, lens):
        o, lse = decode_fwd(q16, q_rot, tiles, k16, v16, flags, work, lens, 128 ** -0.5, ns, tps, c.fp4_layout, "pre")
        return o * 2, lse  # something for the graph around the op

    args = (q16, q_rot, c.tiles, c.k16, c.v16, flags, work, lens)
    o0, l0 = f(*args)
    o1, l1 = torch.compile(f, fullgraph=True)(*args)
    assert _rel(o1, o0) < 1e-3 and (l1 - l0).abs().max().item() < 5e-5
    ref, lse_ref = thrift_decode_ref(q, c, return_lse=True, flags=flags)
    assert _rel(o1 / 2, ref) <= 2e-3 and (l1 - lse_ref).abs().max().item() <= 2e-3


@pytest.mark.parametrize("D,dt", [(64, torch.float16), (128, torch.float16), (128, torch.bfloat16)])
def test_token_appends_match_one_shot_on_gpu(D, dt, rng_seed):
    """Token-by-token appends give the same FP4 tiles as one append, and the same decode output bit for bit (with the
    cache's defaults: Hadamard-rotated K, mse scale rule)."""
    H, L = 2, 200
    g = torch.Generator(device="cuda").manual_seed(rng_seed)
    k = torch.randn((1, L, H, D), generator=g, device="cuda").to(dt)
    v = torch.randn((1, L, H, D), generator=g, device="cuda").to(dt)
    c1 = ThriftKVCache(1, H, D, capacity=64, dtype=dt, device="cuda")
    c2 = ThriftKVCache(1, H, D, capacity=256, dtype=dt, device="cuda")
    for i in range(L):
        c1.append(k[:, i:i + 1], v[:, i:i + 1])
    c2.append(k, v)
    assert c1.qk_rotation == "hadamard" and c1.scale_rule == "mse"
    nb = -(-L // 64)
    assert torch.equal(c1.tiles[:, :nb], c2.tiles[:, :nb])
    q = torch.randn((1, 1, 2 * H, D), generator=g, device="cuda").to(dt)
    o1 = thrift_decode(q, c1, budget=0.3, schedule=_STATIC)  # static: a deterministic merge order
    o2 = thrift_decode(q, c2, budget=0.3, schedule=_STATIC)
    assert torch.equal(o1, o2)


def test_bad_inputs():
    c = ThriftKVCache(1, 2, 64, device="cuda")
    c.append(torch.zeros((1, 5, 2, 64), device="cuda", dtype=torch.float16),
             torch.zeros((1, 5, 2, 64), device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="q must be"):
        thrift_decode(torch.zeros((1, 2, 4, 64), device="cuda", dtype=torch.float16), c)
    with pytest.raises(TypeError, match="dtype"):
        thrift_decode(torch.zeros((1, 1, 4, 64), device="cuda", dtype=torch.bfloat16), c)
    with pytest.raises(ValueError, match="budget"):
        thrift_decode(torch.zeros((1, 1, 4, 64), device="cuda", dtype=torch.float16), c, budget=1.5)
    q = torch.zeros((1, 1, 4, 64), device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="flags must be"):  # too short for the cached blocks
        thrift_decode(q, c, flags=torch.zeros((1, 2, 0), device="cuda", dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        thrift_decode(q, c, flags=torch.zeros((1, 2, 16), device="cuda"))
    with pytest.raises(ValueError, match="schedule"):
        thrift_decode(q, c, schedule={"parts": 3})
    with pytest.raises(ValueError, match="schedule"):
        thrift_decode(q, c, schedule={"tile": 1})


@pytest.mark.parametrize("cfg", [(32, 8, 128, torch.float16, 1.0), (9, 3, 64, torch.bfloat16, 1.0),
                                 (32, 8, 128, torch.bfloat16, 2.0 ** -9)])
def test_bits_layout_bit_identical(cfg, rng_seed):
    """The "bits" FP4 word layout (the default) (shift-and-mask decode; K', V' come out 2^-7-scaled in fp16 and the 2^7 is
    folded into fp32 factors) gives the default layout's output and LSE bit for bit -- also for tiny K and V
    (scale 2^-9: E4M3-subnormal group scales, fp16-subnormal products), where a flush to zero would show."""
    HQ, H, D, dtype, sc = cfg
    lens = [5000, 64 * 80, 999]
    c1 = _build(lens, H, D, dtype, rng_seed, k_scale=sc, v_scale=sc, fp4_layout="nibble")
    c2 = _build(lens, H, D, dtype, rng_seed, k_scale=sc, v_scale=sc, fp4_layout="bits")
    assert torch.equal(kv_relayout(c1.tiles, "nibble", "bits"), c2.tiles)
    g = torch.Generator(device="cuda").manual_seed(rng_seed + 1)
    q_scale = 1.5 if sc == 1.0 else 64.0  # larger q for tiny K (below E4M3 saturation of q's scales: 448 * 6)
    q = (torch.randn((len(lens), 1, HQ, D), generator=g, device="cuda") * q_scale).to(dtype)
    for budget, sched in ((0.0, _STATIC), (0.05, {"num_splits": 1}), (0.25, _STATIC)):
        flags = select_decode_blocks(q, c1, budget)
        _poison()
        o1, l1 = thrift_decode(q, c1, return_lse=True, flags=flags, schedule=sched)
        _poison()
        o2, l2 = thrift_decode(q, c2, return_lse=True, flags=flags, schedule=sched)
        torch.cuda.synchronize()
        assert torch.equal(o1, o2) and torch.equal(l1, l2), (budget, _rel(o2, o1))
    ref, lse_ref = thrift_decode_ref(q, c2, return_lse=True, flags=flags)
    err = _rel(o2, ref)
    print(f"bits layout {cfg}: bit-identical to nibble; rel L2 vs reference {err:.2e}")
    if sc == 1.0:
        # Not for the tiny case: there the logits are ~0, O is a near-uniform average of V (|O| << |V|) and the
        # FP4-vs-reference gap of the scheme itself, identical for both layouts, was 2.6e-3 (H100, 2026-11-22).
        assert err <= 2e-3 and (l2 - lse_ref).abs().max().item() <= 2e-3
