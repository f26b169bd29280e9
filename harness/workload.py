"""Built-in long-context attention workload: synthetic Q, K, V with the structure real LLM attention has.

Random Gaussian Q/K give nearly uniform attention, on which every block is equally (un)important; real
long-context attention is concentrated (sinks, a local band, a few retrieved tokens, a diffuse tail), and that
concentration is what both the FP4 error and ThriftAttention's block selection act on (the paper's Eq. 4: a key's
share of the output error scales with its attention weight). `make_workload` builds, per KV head (its query heads
share the structure and draw their own noise); strengths are contributions to the scaled logit s = q.k / sqrt(D),
independent of D:

* background noise   -- i.i.d. N(0, 1) channels in Q and K: a logit spread of about 1 over all keys (the diffuse
                        tail of the attention row).
* local mass         -- an Ornstein-Uhlenbeck process (correlation length 48 tokens) shared by Q and K, so
                        q_i.k_j ~ +6 exp(-|i - j| / 48): the diagonal band of real attention maps (which RoPE models
                        show as recency bias). It decays monotonically, with no far echoes.
* topic drift        -- a second, slow OU process (correlation length S/16, clamped to [512, 4096] tokens), +2:
                        stretches of text on the same topic attend to each other; visible to block means.
* attention sinks    -- the first 4 keys get a large component along a per-KV-head "sink" direction that every query
                        shares (+8), and "delimiter" keys (one every ~2k tokens, jittered) a weaker one (+6): the
                        initial and non-initial sinks of the paper's error heatmaps. Initial-sink values are small
                        (x0.2), as in real models where the sink acts as a no-op.
* retrieval keys     -- needles (one per 4k tokens, at least 4 from 1k tokens on): one key far back (at least
                        max(1024, S/8) tokens) matched by a window of 32 queries in the last quarter of the sequence
                        (+9): retrieval heads answering a question at the end of a long prompt.
* outlier channels   -- 4 head_dim channels per KV head where K carries a constant 10x bias (plus 0.3 noise; the
                        "massive activations" of real LLMs) and Q a 3x same-sign magnitude. In K the bias sets the FP4
                        scale of its 16-channel group and crushes the group's other channels; the bias itself adds a
                        per-row constant to the logits (softmax-invariant in exact arithmetic, not after FP4).
                        SageAttention-style smoothing (subtracting the K mean) would remove most of this error; it is
                        deliberately not done here (the contract's FP4 path has no smoothing).
* values             -- Student-t (4 degrees of freedom) noise plus a shared per-channel mean of the same size (real
                        value vectors are not centred, so outputs do not average out to ~0), log-normal per-channel
                        scales.

Deterministic given `seed` (one CPU torch.Generator drives everything, in a fixed order; fp32, then cast).
Measured (seed 0, 8k tokens, heads_kv=1, last 256 queries of query head 0, exact softmax): ~21% of the attention
mass on the first key block, ~39% within 128 tokens of the diagonal.
"""
from __future__ import annotations

import math

import torch

N_SINKS = 4  # initial sink tokens
SINK_LOGIT = 8.0
SINK_KQ_RATIO = 1.5  # sink key component / shared query component
DELIM_LOGIT = 6.0  # non-initial sinks
DELIM_EVERY = 2048
LOCAL_LOGIT = 6.0
LOCAL_LEN = 48.0  # tokens
DRIFT_LOGIT = 2.0
NEEDLE_LOGIT = 9.0
NEEDLE_EVERY = 4096
NEEDLE_WINDOW = 32  # queries per needle
N_OUTLIERS = 4  # outlier channels per KV head
OUTLIER_MAG = 10.0  # K outlier bias (x the unit channel std)
K_OUTLIER_NOISE = 0.3
Q_OUTLIER_MAG = 3.0
V_DOF = 4
V_MEAN = 1.0


def _ou(g: torch.Generator, S: int, D: int, corr_len: float, block: int = 256) -> torch.Tensor:
    """[S, D] stationary Ornstein-Uhlenbeck (AR(1)) process, unit variance per channel, E[c_i . c_j] / D =
    exp(-|i - j| / corr_len). Generated 256 steps at a time with a [256, 256] transfer matrix."""
    rho = math.exp(-1.0 / corr_len)
    tau = torch.arange(block, dtype=torch.float64)
    diff = tau[:, None] - tau[None, :]
    trans = torch.where(diff >= 0, rho ** diff.clamp(min=0), torch.zeros((), dtype=torch.float64)).float()
    carry = rho ** (tau + 1.0)  # weight of the previous block's last state
    out = torch.empty((S, D))
    prev = torch.randn(D, generator=g)  # stationary start
    innov = math.sqrt(1.0 - rho * rho)
    for t0 in range(0, S, block):
        n = min(block, S - t0)
        eps = torch.randn(n, D, generator=g) * innov
        c = trans[:n, :n] @ eps + carry[:n, None].float() * prev[None, :]
        out[t0:t0 + n] = c
        prev = c[-1]
    return out


def _unit(g: torch.Generator, D: int) -> torch.Tensor:
    u = torch.randn(D, generator=g)
    return u / u.norm()


def make_workload(seq_len: int, *, batch: int = 1, heads_q: int = 8, heads_kv: int = 2, head_dim: int = 128,
                  dtype: torch.dtype = torch.float16, seed: int = 0):
    """(q, k, v): q [batch, seq_len, heads_q, head_dim], k and v [batch, seq_len, heads_kv, head_dim], on the CPU,
    in `dtype`. See the module docstring for what each component models."""
    for name, val, lo in (("seq_len", seq_len, 1), ("batch", batch, 1), ("heads_q", heads_q, 1),
                          ("heads_kv", heads_kv, 1), ("head_dim", head_dim, 8), ("seed", seed, 0)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"make_workload: {name} must be an int, got {type(val).__name__}")
        if val < lo:
            raise ValueError(f"make_workload: {name} must be >= {lo}, got {val}")
    if heads_q % heads_kv:
        raise ValueError(f"make_workload: heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"make_workload: dtype must be float16/bfloat16/float32, got {dtype}")

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    S, D, G = seq_len, head_dim, heads_q // heads_kv
    sd = math.sqrt(D)
    q = torch.empty((batch, S, heads_q, D), dtype=dtype)
    k = torch.empty((batch, S, heads_kv, D), dtype=dtype)
    v = torch.empty((batch, S, heads_kv, D), dtype=dtype)
    # Sinks: keys get alpha * u, queries beta * u, alpha * beta / sqrt(D) = SINK_LOGIT, alpha = SINK_KQ_RATIO * beta.
    beta = math.sqrt(SINK_LOGIT * sd / SINK_KQ_RATIO)
    drift_len = min(max(S / 16.0, 512.0), 4096.0)
    n_delims = max(0, (S - 1) // DELIM_EVERY)
    n_needles = max(4, S // NEEDLE_EVERY) if S >= 1024 else 0

    for b in range(batch):
        # Delimiter (non-initial sink) positions, shared by the batch row's heads.
        delims = (torch.arange(1, n_delims + 1) * DELIM_EVERY + torch.randint(-64, 64, (n_delims,), generator=g))
        delims = delims.clamp(N_SINKS, S - 1)
        for hk in range(heads_kv):
            local = _ou(g, S, D, LOCAL_LEN) * math.sqrt(LOCAL_LOGIT / sd)
            drift = _ou(g, S, D, drift_len) * math.sqrt(DRIFT_LOGIT / sd)
            sink_dir = _unit(g, D)
            outl = torch.randperm(D, generator=g)[:N_OUTLIERS]
            outl_sign = torch.where(torch.rand(N_OUTLIERS, generator=g) < 0.5, -1.0, 1.0)

            kk = torch.randn(S, D, generator=g) + local + drift
            kk[:N_SINKS] += SINK_KQ_RATIO * beta * sink_dir
            kk[delims] += (DELIM_LOGIT * sd / beta) * sink_dir
            kk[:, outl] = OUTLIER_MAG * outl_sign + K_OUTLIER_NOISE * torch.randn(S, N_OUTLIERS, generator=g)

            # Needles: a window of queries near the end (the "question": in the last quarter, or the last 512
            # tokens) and a key far before it (at least max(1024, S/8) tokens back when the sequence allows).
            needles = []
            gap = max(1024, S // 8)
            for _ in range(n_needles):
                t = int(torch.randint(max(0, S - max(S // 4, 512)), S - NEEDLE_WINDOW + 1, (1,), generator=g))
                p = int(torch.randint(0, t - gap if t > gap else max(1, t // 2), (1,), generator=g))
                w = _unit(g, D)
                w[outl] = 0.0
                w = w / w.norm()
                gamma = math.sqrt(NEEDLE_LOGIT * sd)  # key and query parts of equal norm
                kk[p] += gamma * w
                needles.append((t, gamma * w))

            vv = _student_t(g, (S, D), V_DOF) + V_MEAN * torch.randn(D, generator=g)[None, :]
            vv = vv * torch.exp(0.5 * torch.randn(D, generator=g))[None, :]
            vv[:N_SINKS] *= 0.2
            k[b, :, hk] = kk.to(dtype)
            v[b, :, hk] = vv.to(dtype)

            for hq in range(hk * G, (hk + 1) * G):
                qq = torch.randn(S, D, generator=g) + local + drift
                qq += beta * sink_dir * (0.8 + 0.4 * torch.rand(S, 1, generator=g))
                qq[:, outl] = Q_OUTLIER_MAG * outl_sign * (0.5 + torch.rand(S, N_OUTLIERS, generator=g))
                for t, wq in needles:
                    qq[t:t + NEEDLE_WINDOW] += wq
                q[b, :, hq] = qq.to(dtype)
    return q, k, v


def _student_t(g: torch.Generator, shape, dof: float) -> torch.Tensor:
    """Student-t samples from the generator: N(0,1) / sqrt(chi2(dof) / dof), chi2 as a sum of squared normals
    (dof must be an integer here)."""
    z = torch.randn(shape, generator=g)
    n = int(dof)
    chi2 = (torch.randn((n, *shape), generator=g) ** 2).sum(0)
    return z / torch.sqrt(chi2 / n)
