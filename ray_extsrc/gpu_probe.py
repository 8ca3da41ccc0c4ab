"""Whether this process may use a GPU, judged without initialising CUDA (which would forbid fork)."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["gpu_available"]


def gpu_available() -> bool:
    """A GPU this process may use, judged without initialising CUDA (that would forbid fork)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return False
    if not os.path.isdir("/proc/driver/nvidia/gpus") or not os.listdir("/proc/driver/nvidia/gpus"):
        return False
    return importlib.util.find_spec("cupy") is not None
