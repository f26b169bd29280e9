"""Small decode case for compute-sanitizer (memcheck / racecheck): B=2 ragged lengths (one partial block),
GQA 8/2, D=64, fp16, budget 0.25 so both the FP4 tiles and the FP16 blocks and the split combine run -- once with the
plan thrift_decode picks here (1 tile per split: static splits) and once with the dynamic work items (DecodeConfig
.work, its atomic counters and their reset), 2 splits per head so the counter is taken."""
import torch

from kernels.decode_interface import thrift_decode
from kernels.kv_cache import ThriftKVCache

torch.manual_seed(0)
B, H, HQ, D, lens = 2, 2, 8, 64, [200, 333]
k = torch.randn(B, max(lens), H, D, device="cuda", dtype=torch.float16)
v = torch.randn(B, max(lens), H, D, device="cuda", dtype=torch.float16)
c = ThriftKVCache(B, H, D, capacity=64, dtype=torch.float16, device="cuda")
c.append(k, v, num_new=lens)
q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.float16)
out = thrift_decode(q, c, budget=0.25)
out_dyn = thrift_decode(q, c, budget=0.25, schedule={"work": "dynamic", "num_splits": 2})
torch.cuda.synchronize()
print("decode sanitize case ok", tuple(out.shape), bool(torch.isfinite(out).all() and torch.isfinite(out_dyn).all()),
      f"static vs dynamic max |diff| {(out.float() - out_dyn.float()).abs().max().item():.1e}")
