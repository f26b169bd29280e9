"""Block selection: exact expected indices on hand-built cases, budget rule, causal/bottom-right visibility,
-1 padding, GQA, partial last blocks, every method, bad inputs."""
import math

import pytest
import torch

from kernels.selection import (
    block_means,
    block_visibility,
    select_blocks,
    selection_mask,
    topk_for_budget,
)

BS = 64


def _planted(block_vals, S=None, D=16, heads=1, channel=0, jitter=True):
    """[1, S, heads, D] fp32 with every token of block j equal to block_vals[j] * e_channel, plus a +-1 zig-zag
    in another channel whose block mean is zero (so the selection must use means, not single tokens)."""
    n = len(block_vals)
    S = S if S is not None else n * BS
    x = torch.zeros(1, S, heads, D)
    for j, a in enumerate(block_vals):
        x[:, j * BS:min(S, (j + 1) * BS), :, channel] = a
    if jitter:
        zig = torch.tensor([1.0, -1.0]).repeat(BS // 2)
        for j in range(n):
            lo, hi = j * BS, min(S, (j + 1) * BS)
            if (hi - lo) % 2 == 0:
                x[:, lo:hi, :, (channel + 1) % D] = 50.0 * zig[: hi - lo, None]
    return x


def test_topk_for_budget_values():
    assert [topk_for_budget(2048, f, True) for f in (0.05, 0.10, 0.25)] == [52, 105, 274]
    assert topk_for_budget(2048, 0.0, True) == 0
    assert topk_for_budget(2048, 1.0, True) == 2048
    assert topk_for_budget(2048, 1.0, False) == 2048
    assert topk_for_budget(100, 0.05, False) == 5
    assert topk_for_budget(100, 0.25, False) == 25
    assert topk_for_budget(10, 1e-4, True) == 1  # clamped to >= 1 for any positive budget
    # The causal k covers the budget's fraction of the causal block-pair area (up to rounding).
    n = 512
    for f in (0.05, 0.1, 0.25, 0.5):
        kk = topk_for_budget(n, f, True)
        covered = sum(min(kk, i + 1) for i in range(n))
        assert abs(covered / (n * (n + 1) / 2) - f) < 2.0 / n
    with pytest.raises(ValueError, match="budget"):
        topk_for_budget(16, 1.5, True)
    with pytest.raises(ValueError, match="n_kv_blocks"):
        topk_for_budget(0, 0.5, True)


def test_block_means_partial_last_block():
    for S in (200, 130, 64, 1):
        x = torch.randn(2, S, 3, 16, dtype=torch.float16)
        m = block_means(x)
        nb = math.ceil(S / BS)
        assert m.shape == (2, nb, 3, 16) and m.dtype == torch.float32
        for j in range(nb):
            ref = x[:, j * BS:min(S, (j + 1) * BS)].double().mean(dim=1)
            torch.testing.assert_close(m[:, j].double(), ref, rtol=1e-5, atol=1e-6)


def _seq_means_numpy(x, bs):
    """Independent float32 emulation of block_means' definition: per block, acc = fl32(acc + x_t) in token order from
    +0.0, then fl32(acc / n_valid)."""
    import numpy as np

    a = x.float().numpy()
    B, S, H, D = a.shape
    nb = -(-S // bs)
    out = np.zeros((B, nb, H, D), dtype=np.float32)
    for j in range(nb):
        acc = np.zeros((B, H, D), dtype=np.float32)
        toks = range(j * bs, min(S, (j + 1) * bs))
        for t in toks:
            acc = (acc + a[:, t]).astype(np.float32)
        out[:, j] = acc / np.float32(len(toks))
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_block_means_token_order_bits(dtype, rng_seed):
    """block_means is the token-order fp32 sum / count bit for bit (what the quantizer kernel emits for the public
    op's selection), on data where the summation order changes the result."""
    import numpy as np

    g = torch.Generator().manual_seed(rng_seed)
    S = 3 * BS + 37  # a partial last block
    x = (torch.randn(2, S, 3, 8, generator=g) * 10).to(dtype)
    # order-sensitive blocks: a large value, then many small ones each below half an ulp of the running sum (a
    # token-order sum drops them, a pairwise one does not)
    # (1024 + 2^-14 is a tie at half an fp32 ulp: it rounds back to 1024)
    x[0, :BS, 0, 0] = 2.0 ** -14
    x[0, 0, 0, 0] = 1024.0
    x[1, 3 * BS:, 2, 5] = 2.0 ** -14
    x[1, 3 * BS, 2, 5] = 1024.0
    want = _seq_means_numpy(x, BS)
    blk = x[0, :BS, 0, 0].float().numpy()
    pairwise = blk.copy()
    while pairwise.size > 1:
        pairwise = (pairwise[0::2] + pairwise[1::2]).astype(np.float32)
    assert pairwise[0] != want[0, 0, 0, 0] * np.float32(BS), "test data is not order-sensitive"
    got = block_means(x, BS)
    assert got.dtype == torch.float32 and got.shape == (2, 4, 3, 8)
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))
    assert np.array_equal(block_means(x, 16).numpy().view(np.int32), _seq_means_numpy(x, 16).view(np.int32))


def test_block_mean_exact_order_causal_and_padding():
    # K block means along channel 0: [1, 3, 2, 5]; head 0's queries +e0 (prefer large), head 1's -e0 (small).
    k = _planted([1.0, 3.0, 2.0, 5.0])
    q = torch.cat([_planted([1.0] * 4), _planted([-1.0] * 4)], dim=2)
    sel = select_blocks(q, k, top_k=4, causal=True)
    assert sel.dtype == torch.int32 and sel.shape == (1, 2, 4, 4)
    assert sel[0, 0].tolist() == [[0, -1, -1, -1], [1, 0, -1, -1], [1, 2, 0, -1], [3, 1, 2, 0]]
    assert sel[0, 1].tolist() == [[0, -1, -1, -1], [0, 1, -1, -1], [0, 2, 1, -1], [0, 2, 1, 3]]
    # Non-causal: every block visible to every query block.
    sel_nc = select_blocks(q, k, top_k=4, causal=False)
    assert sel_nc[0, 0].tolist() == [[3, 1, 2, 0]] * 4
    # top_k=2 keeps the two best of each row.
    assert select_blocks(q, k, top_k=2)[0, 0].tolist() == [[0, -1], [1, 0], [1, 2], [3, 1]]


def test_planted_pair_found_on_noise():
    torch.manual_seed(1234)
    q = 0.3 * torch.randn(1, 640, 2, 64)
    k = 0.3 * torch.randn(1, 640, 1, 64)
    d = torch.randn(64)
    q[:, 7 * BS:8 * BS, 1] += 2.0 * d  # query block 7 of head 1 ...
    k[:, 2 * BS:3 * BS, 0] += 2.0 * d  # ... strongly matches key block 2
    sel = select_blocks(q, k, budget=0.05)
    assert sel.shape[-1] == topk_for_budget(10, 0.05, True)
    assert int(sel[0, 1, 7, 0]) == 2
    # Rows are sorted by descending score and hold distinct visible blocks.
    qm, km = block_means(q), block_means(k)
    for h in range(2):
        for i in range(10):
            row = [j for j in sel[0, h, i].tolist() if j >= 0]
            assert len(row) == len(set(row)) == min(sel.shape[-1], i + 1)
            sc = [float(qm[0, i, h] @ km[0, j, 0]) for j in row]
            assert sc == sorted(sc, reverse=True)


def test_bottom_right_causal_sq_lt_skv():
    # Sq=128, Skv=320: query i sees keys <= i + 192. Query block 0 (last row 63) sees keys <= 255 -> blocks 0..3;
    # block 1 (last row 127) sees <= 319 -> blocks 0..4.
    q, k = torch.randn(1, 128, 1, 16), torch.randn(1, 320, 1, 16)
    vis = block_visibility(128, 320, BS, True)
    assert vis.tolist() == [[True, True, True, True, False], [True] * 5]
    sel = select_blocks(q, k, top_k=5, method="local")
    assert sel[0, 0].tolist() == [[3, 2, 1, 0, -1], [4, 3, 2, 1, 0]]


def test_bottom_right_causal_sq_gt_skv_leading_blocks_empty():
    # Sq=320, Skv=128: query i sees keys <= i - 192; rows 0..191 see nothing (query blocks 0..2 all -1).
    q, k = torch.randn(1, 320, 1, 16), torch.randn(1, 128, 1, 16)
    sel = select_blocks(q, k, top_k=2, method="local")
    assert sel[0, 0].tolist() == [[-1, -1], [-1, -1], [-1, -1], [0, -1], [1, 0]]
    for method in ("block_mean", "quest", "random"):
        s = select_blocks(q, k, budget=1.0, method=method)
        assert s[0, 0, :3].eq(-1).all()
        assert sorted(s[0, 0, 4].tolist()) == [0, 1] and sorted(s[0, 0, 3].tolist()) == [-1, 0]


def test_odd_lengths_partial_block_mean_over_valid_tokens():
    # Skv = 200: key block 3 holds 8 tokens. Its tokens are 4 e0 (mean 4 over the valid tokens; 0.5 if averaged
    # over 64), key block 1 is 2 e0: the correct mean ranks block 3 first.
    k = _planted([0.0, 2.0, 0.0, 4.0], S=200)
    q = _planted([1.0, 1.0, 1.0, 1.0], S=200)
    sel = select_blocks(q, k, top_k=2)
    assert sel[0, 0, 3].tolist() == [3, 1]
    # Skv = 130: key block 2 has 2 tokens.
    k = _planted([0.0, 2.0, 3.0], S=130)
    q = _planted([1.0, 1.0, 1.0], S=130)
    assert select_blocks(q, k, top_k=1)[0, 0, :, 0].tolist() == [0, 1, 2]
    assert select_blocks(q, k, top_k=3)[0, 0, 2].tolist() == [2, 1, 0]


def test_gqa_means_shared_selection_per_query_head():
    # KV head 0 favours key block 1, KV head 1 key block 2; four query heads (two per KV head) all +e0.
    k = torch.cat([_planted([0.0, 5.0, 1.0, 0.0]), _planted([0.0, 1.0, 5.0, 0.0])], dim=2)
    q = _planted([1.0] * 4, heads=4)
    sel = select_blocks(q, k, top_k=1)
    assert sel[0, :, 3, 0].tolist() == [1, 1, 2, 2]
    # Per query head: flipping head 1's queries changes only head 1.
    q2 = q.clone()
    q2[:, :, 1] *= -1
    sel2 = select_blocks(q2, k, top_k=1)
    assert sel2[0, 1, 3, 0] != 1 and sel2[0, [0, 2, 3], 3, 0].tolist() == [1, 2, 2]
    # Sharing K means over the group == repeating K heads explicitly.
    qr, kr = torch.randn(2, 300, 6, 32), torch.randn(2, 300, 2, 32)
    for method in ("block_mean", "quest"):
        a = select_blocks(qr, kr, budget=0.3, method=method)
        b = select_blocks(qr, kr.repeat_interleave(3, dim=2), budget=0.3, method=method)
        assert torch.equal(a, b)


def test_quest_uses_channel_min_max():
    # Channel 0: key block 1 holds tokens {0, 8} (mean 4, max 8), key block 2 all 5 (mean 5, max 5).
    k = torch.zeros(1, 192, 1, 16)
    k[:, BS:2 * BS:2, 0, 0] = 8.0
    k[:, 2 * BS:3 * BS, 0, 0] = 5.0
    q = torch.zeros(1, 192, 1, 16)
    q[:, :, 0, 0] = 1.0
    assert select_blocks(q, k, top_k=2, method="block_mean")[0, 0, 2].tolist() == [2, 1]
    assert select_blocks(q, k, top_k=2, method="quest")[0, 0, 2].tolist() == [1, 2]
    # Negative query channel picks the key block's channel minimum: -1 * min -> block 1 (min 0) beats block 2.
    q[:, :, 0, 0] = -1.0
    k[:, 0:BS, 0, 0] = -3.0  # key block 0 has min -3 -> score 3, the best
    assert select_blocks(q, k, top_k=3, method="quest")[0, 0, 2].tolist() == [0, 1, 2]


def test_local_method():
    q, k = torch.randn(1, 300, 1, 16), torch.randn(1, 300, 1, 16)
    sel = select_blocks(q, k, top_k=3, method="local")
    assert sel[0, 0].tolist() == [[0, -1, -1], [1, 0, -1], [2, 1, 0], [3, 2, 1], [4, 3, 2]]
    # Non-causal: a band around the (bottom-right) diagonal, ties to the earlier block.
    sel = select_blocks(q, k, top_k=3, method="local", causal=False)
    assert sel[0, 0].tolist() == [[0, 1, 2], [1, 0, 2], [2, 1, 3], [3, 2, 4], [4, 3, 2]]


def test_random_method_reproducible_and_visible():
    q, k = torch.randn(2, 500, 4, 16), torch.randn(2, 500, 2, 16)
    a = select_blocks(q, k, budget=0.3, method="random", seed=7)
    b = select_blocks(q, k, budget=0.3, method="random", seed=7)
    c = select_blocks(q, k, budget=0.3, method="random", seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    vis = block_visibility(500, 500, BS, True)
    m = selection_mask(a, 8)
    assert not (m & ~vis).any()
    assert (m.sum(-1) == torch.clamp(vis.sum(-1), max=a.shape[-1])).all()


def test_ties_lower_index_first():
    q, k = torch.zeros(1, 256, 1, 16), torch.zeros(1, 256, 1, 16)
    assert select_blocks(q, k, top_k=4, causal=False)[0, 0, 0].tolist() == [0, 1, 2, 3]


def test_budget_zero_and_one():
    q, k = torch.randn(1, 333, 2, 32), torch.randn(1, 333, 1, 32)
    s0 = select_blocks(q, k, budget=0.0)
    assert s0.shape == (1, 2, 6, 0) and s0.dtype == torch.int32
    assert not selection_mask(s0, 6).any()
    for causal in (True, False):
        vis = block_visibility(333, 333, BS, causal)
        for method in ("block_mean", "quest", "local", "random"):
            s1 = select_blocks(q, k, budget=1.0, causal=causal, method=method)
            assert s1.shape == (1, 2, 6, 6)
            assert torch.equal(selection_mask(s1, 6), vis.expand(1, 2, 6, 6))
    # top_k overrides the budget and is clamped to the number of key blocks.
    assert select_blocks(q, k, budget=0.0, top_k=2).shape[-1] == 2
    assert select_blocks(q, k, budget=0.5, top_k=0).shape[-1] == 0
    assert select_blocks(q, k, top_k=100).shape[-1] == 6


def test_selection_mask():
    sel = torch.tensor([[[[2, 0, -1], [-1, -1, -1]]]], dtype=torch.int32)
    m = selection_mask(sel, 4)
    assert m.tolist() == [[[[True, False, True, False], [False, False, False, False]]]]
    with pytest.raises(ValueError, match="sel"):
        selection_mask(torch.tensor([[[[4]]]], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="sel"):
        selection_mask(sel.float(), 4)


def test_bad_inputs():
    q, k = torch.randn(1, 128, 4, 64), torch.randn(1, 128, 2, 64)
    with pytest.raises(ValueError, match="method"):
        select_blocks(q, k, method="oracle")
    with pytest.raises(ValueError, match="budget"):
        select_blocks(q, k, budget=1.5)
    with pytest.raises(ValueError, match="budget"):
        select_blocks(q, k, budget=float("nan"))
    with pytest.raises(TypeError, match="budget"):
        select_blocks(q, k, budget="0.5")
    with pytest.raises(ValueError, match="multiple"):
        select_blocks(torch.randn(1, 128, 3, 64), k)
    with pytest.raises(TypeError, match="q"):
        select_blocks(q.to(torch.int32), k)
    with pytest.raises(TypeError, match="k"):
        select_blocks(q, k.half())
    with pytest.raises(ValueError, match="rank-4"):
        select_blocks(q[0], k)
    with pytest.raises(ValueError, match="empty"):
        select_blocks(q[:, :0], k)
    with pytest.raises(ValueError, match="head_dim"):
        select_blocks(q, torch.randn(1, 128, 2, 32))
    with pytest.raises(ValueError, match="top_k"):
        select_blocks(q, k, top_k=-1)
    with pytest.raises(ValueError, match="device"):
        select_blocks(q, k.to("meta"))


def test_select_topk_key_order_matches_stable_sort():
    """kernels/select_topk.py ranks block j of a row by rank_key: the int64 (k << 32) + (2^32 - 1 - j), k the signed
    (sign-extended) int32 order key of the score; that key's arithmetic, emulated in numpy, orders like
    select_blocks' torch.sort(descending, stable): +-0 equal,
    NaN first (at any index, block 0 too), +-inf, subnormals, ties by ascending index. The rounds are emulated as the
    kernel runs them (each takes the largest key strictly below the last), so a key equal to the first bound fails."""
    import numpy as np

    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.0, -1.0, 3.4e38, -3.4e38, 1.0, 0.0,
                        -0.0, np.nan, 2.5, -2.5, 1e-30], dtype=np.float32)
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 300))
        x = rng.choice(np.concatenate([special, rng.standard_normal(20).astype(np.float32)]), size=n)
        z = (x + np.float32(0.0)).astype(np.float32)  # add.rn.f32 z, s, +0: -0 -> +0
        u = z.view(np.int32)
        m = (u >> 31) & np.int32(0x7FFFFFFF)          # shr.s32 / and.b32
        key = np.where(np.isnan(x), np.int32(0x7F800001), u ^ m).astype(np.int64)  # selp: NaN above +inf
        comp = (key << 32) + (0xFFFFFFFF - np.arange(n, dtype=np.int64))
        # the kernel's rounds: round r takes the largest key strictly below round r-1's (the first: below INT64_MAX)
        ours, prev = [], np.iinfo(np.int64).max
        for _ in range(n):
            below = comp[comp < prev]
            if below.size == 0:
                break
            prev = below.max()
            ours.append(int(np.flatnonzero(comp == prev)[0]))
        ref = torch.sort(torch.from_numpy(x), descending=True, stable=True).indices.numpy()
        assert ours == ref.tolist(), (trial, x, ours, ref)
