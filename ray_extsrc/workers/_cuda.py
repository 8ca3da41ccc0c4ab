"""Is the CUDA driver initialised in this process? Asked without initialising it.

Forking a process whose CUDA driver is initialised gives children a CUDA state they cannot use
(any CUDA call in them fails or hangs), so fork-mode workers must start before that. We look for
libcuda among the libraries already loaded (RTLD_NOLOAD never loads it) and ask it for the device
count, which answers CUDA_ERROR_NOT_INITIALIZED until someone has called cuInit.
"""

from __future__ import annotations

import ctypes
import os

_CUDA_SUCCESS = 0


def cuda_initialized() -> bool:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return lib.cuDeviceGetCount(ctypes.byref(count)) == _CUDA_SUCCESS
    return False
