"""Which 64x64 (query block, key block) pairs ThriftAttention computes in FP16.

Every query block i picks the top-k causally visible key blocks j by a cheap score; those pairs run on the FP16
path, all other visible pairs on the FP4 path (see kernels/reference.py). Result: int32 [B, Hq, n_q_blocks, k_max],
each row sorted by descending score (ties: lower block index first), padded with -1 where a query block sees fewer
than k_max key blocks.

Conventions (shared with the kernels):
* Tensors are [B, S, H, D]; n_q_blocks = ceil(Sq / block_size), n_kv_blocks = ceil(Skv / block_size). The last,
  partial block's statistics are over its valid tokens only.
* Causal masking is bottom-right aligned: query i sees keys j <= i + Skv - Sq (chunked prefill / decode). Key block
  j is visible to query block i if any of its keys is visible to any query of the block, i.e. to the block's last
  query. With Sq > Skv the leading queries see nothing; a query block with no visible key block gets all -1.
* GQA/MQA: key statistics are per KV head (shared by its Hq/Hkv query heads); selection is per query head.
* k (k_max) comes from the budget f, a fraction of the (causal) block-pair area, see `topk_for_budget`;
  `top_k=` overrides it. budget == 0 gives k_max == 0 (pure FP4, an empty last dim); budget == 1 selects every
  visible block.

Methods (scores in fp32):
* block_mean: mean(Q block) . mean(K block)   (the paper's heuristic; means as block_means defines them)
* quest:      sum_d qbar_d * (qbar_d >= 0 ? kmax_d : kmin_d), with the key block's channel-wise min/max (an upper
              bound of q.k over the block for q = qbar; Tang et al. 2024)
* local:      the visible blocks nearest the diagonal first, score -|j - diag_i|, where diag_i is the key block
              holding the key aligned (bottom-right) with query block i's last query. Causal: the most recent
              visible blocks, newest first. Non-causal: a band around that diagonal (ties: the earlier block first).
* random:     uniform scores from a CPU torch.Generator seeded with `seed` (reproducible on any device).

Memory: the [n_q_blocks, n_kv_blocks] score matrices are built a few heads at a time (2048^2 floats per head at
128k tokens), never [B, Hq, nqb, nkb] at once.
"""
from __future__ import annotations

import math

import torch

from ._validate import SELECTION_METHODS, check_budget, check_bool, check_choice, check_int, check_qkv, check_tensor

# Elements of [heads, nqb, nkb] score/sort work per chunk (fp32 values + int64 indices of a sort: ~12 B each).
_SCORE_CHUNK = 1 << 22


def topk_for_budget(n_kv_blocks: int, budget: float, causal: bool) -> int:
    """Key blocks per query block for an FP16 budget `budget` (a fraction of the block-pair area).

    Causal: N x N blocks have N(N+1)/2 visible pairs; k blocks per query block (all of them in the first rows,
    which see fewer) cover sum_i min(k, i+1) = k(2N+1-k)/2 pairs; equating that with f N(N+1)/2 gives
    k = ((2N+1) - sqrt((2N+1)^2 - 4 f N (N+1))) / 2. Non-causal: k = f N. Rounded half up, clamped to [1, N];
    budget == 0 -> 0. E.g. N=2048 causal 5/10/25% -> 52/105/274.
    """
    n = check_int("n_kv_blocks", n_kv_blocks, minimum=1, where="topk_for_budget")
    f = check_budget(budget, where="topk_for_budget")
    check_bool("causal", causal, where="topk_for_budget")
    if f == 0.0:
        return 0
    if causal:
        a = 2 * n + 1
        x = (a - math.sqrt(max(a * a - 4.0 * f * n * (n + 1), 0.0))) / 2.0
    else:
        x = f * n
    return int(min(max(math.floor(x + 0.5), 1), n))


def _seq_block_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 [B, nb, H, D]: each block's sum, accumulated in fp32 in token order starting from +0.0 (one rounding per
    add), divided by its number of valid tokens (IEEE division by a tensor: a CUDA division by a Python scalar is a
    multiply by its reciprocal). This order is the definition, not torch.mean's (whose reduction order differs
    between CPU, CUDA and torch versions): the prefill quantizer (quant/quant_kernel.py) emits the same bits for the
    Q and K block means in the pass that reads Q and K anyway, so the public op's selection needs no extra pass
    over them and still equals select_blocks bit for bit (tests/test_prefill_gpu.py). No fp32 copy of x is made:
    fp16 / bf16 values convert exactly inside each add. Cost: block_size dependent torch launches (~1.3 ms for
    [1, 32k, 32, 128] on an H100 on the public op's side stream, profiling/RESULTS.md session 14, with torch.mean
    ~0.11 ms; that version also copied each step's view back and made the counts with a synchronizing host-to-device
    copy, both since removed, not re-timed)."""
    B, S, H, D = x.shape
    nb = -(-S // block_size)
    nfull = S // block_size
    rem = S - nfull * block_size
    acc = torch.zeros((B, nb, H, D), dtype=torch.float32, device=x.device)
    # in-place adds into views made once (`acc[:, :n] += t` would also copy the view back: a launch per step more)
    acc_full, acc_last = acc[:, :nfull], acc[:, nfull:]
    full = x[:, :nfull * block_size].reshape(B, nfull, block_size, H, D).unbind(2)
    for i in range(block_size):
        if nfull:
            acc_full.add_(full[i])
        if i < rem:  # the partial last block: its valid tokens only
            acc_last.add_(x[:, nfull * block_size + i:nfull * block_size + i + 1])
    # made on x's device (a host tensor's .to(cuda) would be a synchronizing copy from pageable memory)
    count = torch.full((nb,), float(block_size), dtype=torch.float32, device=x.device)
    if rem:
        count[nfull] = float(rem)
    return acc / count.view(1, nb, 1, 1)


def _block_reduce(x: torch.Tensor, block_size: int, op: str) -> torch.Tensor:
    """[B, S, H, D] -> fp32 [B, nb, H, D] mean/amin/amax over each block's valid tokens.

    mean: _seq_block_mean (a fixed, token-order fp32 sum; the quantizer kernel's bits). min/max are exact in the
    input dtype."""
    if op == "mean":
        return _seq_block_mean(x, block_size)
    B, S, H, D = x.shape
    nb = -(-S // block_size)
    nfull = S // block_size
    out = torch.empty((B, nb, H, D), dtype=torch.float32, device=x.device)

    def red(t, dim):
        return (torch.amin if op == "min" else torch.amax)(t, dim=dim).float()

    if nfull:
        out[:, :nfull] = red(x[:, :nfull * block_size].reshape(B, nfull, block_size, H, D), 2)
    if nfull < nb:  # partial last block: reduce over its valid tokens only
        out[:, nfull] = red(x[:, nfull * block_size:], 1)
    return out


def block_means(x: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Per-block token means of x [B, S, H, D] in fp32: [B, ceil(S/block_size), H, D]; the last, partial block is
    averaged over its valid tokens. Summed in token order in fp32, then divided (_seq_block_mean: the bits the
    quantizer kernel emits)."""
    check_tensor("x", x, ndim=4, where="block_means")
    check_int("block_size", block_size, minimum=1, where="block_means")
    return _block_reduce(x, block_size, "mean")


def _max_visible_key(sq: int, skv: int, block_size: int, causal: bool, device) -> torch.Tensor:
    """int64 [nqb]: the largest key index any query of block i may see (may be < 0: nothing visible)."""
    nqb = -(-sq // block_size)
    last_q = torch.clamp((torch.arange(nqb, device=device) + 1) * block_size, max=sq) - 1
    if not causal:
        return torch.full_like(last_q, skv - 1)
    return last_q + (skv - sq)


def block_visibility(sq: int, skv: int, block_size: int = 64, causal: bool = True, device=None) -> torch.Tensor:
    """bool [nqb, nkb]: key block j is visible to query block i (any key of j visible to any query of i;
    causal is bottom-right aligned: query i sees keys <= i + skv - sq)."""
    nkb = -(-skv // block_size)
    mk = _max_visible_key(sq, skv, block_size, causal, device)
    first_key = torch.arange(nkb, device=device) * block_size
    return first_key[None, :] <= mk[:, None]


def _select_setup(q, k, budget, causal, method, block_size, top_k, seed, where):
    """Validate select_blocks' arguments: (B, Sq, Hq, Skv, Hkv, nqb, nkb, k_max)."""
    B, Sq, Hq, D, Skv, Hkv = check_qkv(q, k, where=where)
    f = check_budget(budget, where=where)
    check_bool("causal", causal, where=where)
    check_choice("method", method, SELECTION_METHODS, where=where)
    check_int("block_size", block_size, minimum=1, where=where)
    check_int("seed", seed, minimum=0, where=where)
    nqb, nkb = -(-Sq // block_size), -(-Skv // block_size)
    if top_k is None:
        kk = topk_for_budget(nkb, f, causal)
    else:
        kk = min(check_int("top_k", top_k, minimum=0, where=where), nkb)
    return B, Sq, Hq, Skv, Hkv, nqb, nkb, kk


def score_chunks(q, k, *, causal, method, block_size, seed, means=None):
    """Yields (b, h0, h1, scores): the fp32 [h1 - h0, nqb, nkb] scores of query heads h0..h1-1 of batch b, NOT masked
    (select_blocks masks the causally invisible blocks), a few heads at a time (_SCORE_CHUNK). Arguments as
    select_blocks (validated there); shared by select_blocks and kernels/select_topk.py, so both rank the same bits.
    means: optional (qm [B, nqb, Hq, D], km [B, nkb, Hkv, D]) fp32, block_means(q) and block_means(k) computed
    elsewhere (the quantizer kernel's outputs), for method "block_mean" only."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    nqb, nkb = -(-Sq // block_size), -(-Skv // block_size)
    dev = q.device
    group = Hq // Hkv
    if means is not None:
        if method != "block_mean":
            raise ValueError(f"score_chunks: means are for method 'block_mean', got {method!r}")
        qm, km = means
        D = q.shape[3]
        for name, t, shape in (("qm", qm, (B, nqb, Hq, D)), ("km", km, (B, nkb, Hkv, D))):
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == shape
                    and t.device == dev):
                raise ValueError(f"score_chunks: means {name} must be a float32 tensor of shape {shape} on {dev}")
        qm, km = qm.permute(0, 2, 1, 3), km.permute(0, 2, 1, 3)
    elif method in ("block_mean", "quest"):
        qm = _block_reduce(q, block_size, "mean").permute(0, 2, 1, 3)  # [B, Hq, nqb, D]
        if method == "block_mean":
            km = _block_reduce(k, block_size, "mean").permute(0, 2, 1, 3)  # [B, Hkv, nkb, D]
        else:
            kmin = _block_reduce(k, block_size, "min").permute(0, 2, 1, 3)
            kmax = _block_reduce(k, block_size, "max").permute(0, 2, 1, 3)
    elif method == "local":
        # Diagonal key block: holds the key aligned (bottom-right) with the block's last query. Causal: the
        # visible blocks are j <= diag, so this ranks the most recent first; non-causal: a band around it.
        diag = torch.div(_max_visible_key(Sq, Skv, block_size, True, dev), block_size, rounding_mode="floor")
        diag = diag.clamp(0, nkb - 1)
        j = torch.arange(nkb, device=dev)
        local_score = -(j[None, :] - diag[:, None]).abs().to(torch.float32)  # [nqb, nkb]
    else:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)

    hc = max(1, min(Hq, _SCORE_CHUNK // (nqb * nkb)))  # query heads per chunk
    for b in range(B):
        for h0 in range(0, Hq, hc):
            h1 = min(Hq, h0 + hc)
            kv_idx = torch.arange(h0, h1, device=dev) // group  # KV head of each query head
            if method == "block_mean":
                scores = torch.matmul(qm[b, h0:h1], km[b, kv_idx].transpose(-1, -2))
            elif method == "quest":
                qb = qm[b, h0:h1]
                scores = (torch.matmul(qb.clamp(min=0), kmax[b, kv_idx].transpose(-1, -2))
                          + torch.matmul(qb.clamp(max=0), kmin[b, kv_idx].transpose(-1, -2)))
            elif method == "local":
                scores = local_score.expand(h1 - h0, nqb, nkb)
            else:
                scores = torch.rand((h1 - h0, nqb, nkb), generator=gen, dtype=torch.float32).to(dev)
            yield b, h0, h1, scores


def select_blocks(q: torch.Tensor, k: torch.Tensor, *, budget: float = 0.05, causal: bool = True,
                  method: str = "block_mean", block_size: int = 64, top_k: int | None = None,
                  seed: int = 0) -> torch.Tensor:
    """Top-k key blocks per (batch, query head, query block): int32 [B, Hq, nqb, k_max], sorted by descending
    score (ties: lower index first), -1 padded. See the module docstring for the methods and conventions.

    q: [B, Sq, Hq, D]; k: [B, Skv, Hkv, D] (fp16/bf16/fp32, Hq % Hkv == 0). top_k (>= 0) overrides the budget and
    is clamped to n_kv_blocks. seed is used by method="random" only.
    (kernels/select_topk.py computes the same result, and its bitmask, in one CuTe launch on the GPU.)
    """
    B, Sq, Hq, Skv, Hkv, nqb, nkb, kk = _select_setup(q, k, budget, causal, method, block_size, top_k, seed,
                                                      "select_blocks")
    dev = q.device
    out = torch.full((B, Hq, nqb, kk), -1, dtype=torch.int32, device=dev)
    if kk == 0:
        return out
    vis = block_visibility(Sq, Skv, block_size, causal, dev)  # [nqb, nkb]
    for b, h0, h1, scores in score_chunks(q, k, causal=causal, method=method, block_size=block_size, seed=seed):
        scores = scores.masked_fill(~vis, float("-inf"))
        # Stable sort: equal scores keep ascending block order; invisible blocks (-inf) sort last, and are
        # identified by the visibility mask, not by their score. (A torch.topk of unique int64 keys -- score
        # bits, then index -- gives the same order but was slower: H100, 32k tokens, 512 x 512 blocks per head.)
        idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :kk]
        ok = torch.gather(vis.expand(h1 - h0, nqb, nkb), -1, idx)
        out[b, h0:h1] = torch.where(ok, idx, torch.full_like(idx, -1)).to(torch.int32)
    return out


def selection_mask(sel: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """bool [B, Hq, nqb, n_kv_blocks]: True where (query block, key block) is selected (FP16) in `sel`
    (a select_blocks result; -1 entries are padding)."""
    where = "selection_mask"
    if not isinstance(sel, torch.Tensor):
        raise TypeError(f"{where}: sel must be a torch.Tensor, got {type(sel).__name__}")
    if sel.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: sel must be an int32/int64 tensor, got {sel.dtype}")
    if sel.dim() != 4:
        raise ValueError(f"{where}: sel must be [B, Hq, n_q_blocks, k], got shape {tuple(sel.shape)}")
    n = check_int("n_kv_blocks", n_kv_blocks, minimum=1, where=where)
    if sel.numel() and (int(sel.min()) < -1 or int(sel.max()) >= n):
        raise ValueError(f"{where}: sel entries must be -1 or in [0, {n}), got range "
                         f"[{int(sel.min())}, {int(sel.max())}]")
    B, H, nqb, _ = sel.shape
    mask = torch.zeros((B, H, nqb, n + 1), dtype=torch.bool, device=sel.device)
    # -1 padding is scattered into an extra trailing column that is dropped.
    idx = torch.where(sel < 0, torch.full_like(sel, n), sel).long()
    mask.scatter_(-1, idx, True)
    return mask[..., :n]
