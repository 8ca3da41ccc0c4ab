"""GPU tests: each module skips itself cleanly where the machine lacks what it needs (`gpu_ready`)."""

from __future__ import annotations


def gpu_ready(*, nvimgcodec: bool = False, torch: bool = False) -> bool:
    """True where a GPU is visible to CuPy (a device count above 0), and, when asked, nvImageCodec
    imports and torch is a CUDA build that sees the GPU. Any failure on the way means "skip"."""
    from ray_extsrc.pipeline import gpu_available

    if not gpu_available():
        return False
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        if nvimgcodec:
            from nvidia import nvimgcodec as _  # noqa: F401
        if torch:
            import torch as _torch

            if not _torch.cuda.is_available():
                return False
    except Exception:  # no CuPy, no driver, no nvImageCodec, a CPU-only torch: not this machine
        return False
    return True
