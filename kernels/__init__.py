"""kernels package: ThriftAttention CuTe DSL kernels.

`thrift_attention` (the fused prefill) is exported lazily so `import kernels` works without cutlass or CUDA.
"""


def __getattr__(name):
    if name == "thrift_attention":
        from kernels.interface import thrift_attention

        return thrift_attention
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


__all__ = ["thrift_attention"]
