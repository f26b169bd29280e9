"""Small decode case for compute-sanitizer (memcheck / racecheck): B=2 ragged lengths (one partial block),
GQA 8/2, D=64, fp16, budget 0.25 so both the FP4 tiles and the FP16 blocks and the split combine run."""
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
torch.cuda.synchronize()
print("decode sanitize case ok", tuple(out.shape), bool(torch.isfinite(out).all()))
