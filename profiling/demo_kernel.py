"""A tiny but real CuTe DSL kernel, so `profiling.resources` is testable before the project's kernels land.

C[M, N] (fp32) = A[M, K] (fp16, K-major) @ B[N, K]^T (fp16, K-major), one 64x64 output tile per CTA,
4 warps, each A/B k-slab staged through shared memory (so the report has static smem to read) and
multiplied with warp-level ``mma.sync`` m16n8k16 (so the PTX MMA mix is non-empty). Shapes must be
multiples of 64 (M, N) and 32 (K); nothing here is tuned: it exists to be compiled, not to be fast.
"""
import cutlass
import cutlass.cute as cute

TILE_M, TILE_N, TILE_K = 64, 64, 32
NUM_THREADS = 128


@cute.kernel
def _demo_gemm_kernel(mA: cute.Tensor, mB: cute.Tensor, mC: cute.Tensor, tiled_mma: cute.TiledMma):
    tidx, _, _ = cute.arch.thread_idx()
    bm, bn, _ = cute.arch.block_idx()
    # CTA tiles of the global tensors: gA (TILE_M, TILE_K, k), gB (TILE_N, TILE_K, k), gC (TILE_M, TILE_N)
    gA = cute.local_tile(mA, (TILE_M, TILE_K), (bm, None))
    gB = cute.local_tile(mB, (TILE_N, TILE_K), (bn, None))
    gC = cute.local_tile(mC, (TILE_M, TILE_N), (bm, bn))

    smem = cutlass.utils.SmemAllocator()
    sA = smem.allocate_tensor(cutlass.Float16, cute.make_layout((TILE_M, TILE_K), stride=(TILE_K, 1)), 16)
    sB = smem.allocate_tensor(cutlass.Float16, cute.make_layout((TILE_N, TILE_K), stride=(TILE_K, 1)), 16)

    thr_mma = tiled_mma.get_slice(tidx)
    tCsA = thr_mma.partition_A(sA)
    tCsB = thr_mma.partition_B(sB)
    tCgC = thr_mma.partition_C(gC)
    tCrA = tiled_mma.make_fragment_A(tCsA)
    tCrB = tiled_mma.make_fragment_B(tCsB)
    tCrC = tiled_mma.make_fragment_C(tCgC)
    tCrC.fill(0.0)

    k_tiles = cute.size(gA, mode=[2])
    for kt in range(k_tiles):
        # plain element-wise staging: thread t copies elements t, t+128, ... of each slab
        for e in range(tidx, TILE_M * TILE_K, NUM_THREADS):
            r = e // TILE_K
            c = e % TILE_K
            sA[r, c] = gA[r, c, kt]
            sB[r, c] = gB[r, c, kt]
        cute.arch.sync_threads()
        cute.autovec_copy(tCsA, tCrA)
        cute.autovec_copy(tCsB, tCrB)
        cute.gemm(tiled_mma, tCrC, tCrA, tCrB, tCrC)
        cute.arch.sync_threads()
    cute.autovec_copy(tCrC, tCgC)


@cute.jit
def demo_gemm(mA: cute.Tensor, mB: cute.Tensor, mC: cute.Tensor):
    """Host entry: grid (M/64, N/64), 128 threads."""
    op = cute.nvgpu.warp.MmaF16BF16Op(cutlass.Float16, cutlass.Float32, (16, 8, 16))
    tiled_mma = cute.make_tiled_mma(op, (2, 2, 1))
    m = mA.shape[0]
    n = mB.shape[0]
    _demo_gemm_kernel(mA, mB, mC, tiled_mma).launch(
        grid=[m // TILE_M, n // TILE_N, 1], block=[NUM_THREADS, 1, 1])


def fake_args(m: int = 256, n: int = 256, k: int = 128):
    """Fake (shape-only) tensors for `cute.compile(demo_gemm, *fake_args())`: no GPU needed."""
    from cutlass.cute.runtime import make_fake_compact_tensor

    a = make_fake_compact_tensor(cutlass.Float16, (m, k), stride_order=(1, 0))
    b = make_fake_compact_tensor(cutlass.Float16, (n, k), stride_order=(1, 0))
    c = make_fake_compact_tensor(cutlass.Float32, (m, n), stride_order=(1, 0))
    return a, b, c
