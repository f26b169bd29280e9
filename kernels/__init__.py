"""kernels package: ThriftAttention CuTe DSL kernels.

`thrift_attention` (the fused prefill) and `thrift_decode` (split-KV decode over `kernels.kv_cache.ThriftKVCache`)
are exported lazily so `import kernels` works without cutlass or CUDA.
"""

# The entry points open their own NVTX phases (select / quantize / attention / combine, profiling.nvtx_ranges),
# so `python -m harness bench` wraps thrift calls only in the variant/shape scope.
NVTX_PHASES = True


def __getattr__(name):
    if name == "thrift_attention":
        from kernels.interface import thrift_attention

        return thrift_attention
    if name == "thrift_decode":
        from kernels.decode_interface import thrift_decode

        return thrift_decode
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


__all__ = ["thrift_attention", "thrift_decode"]
