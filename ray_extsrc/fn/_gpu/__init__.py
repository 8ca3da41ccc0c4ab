"""GPU implementations of the ``fn`` ops: nvImageCodec decoding (`decode`) and CuPy kernels
(`kernels`). Imported lazily from the ops' ``run_gpu`` methods, never at package import."""
