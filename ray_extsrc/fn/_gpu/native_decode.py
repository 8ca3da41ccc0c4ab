"""One nvImageCodec call per batch with no Python per sample: `_batch_decode.c` over its C API.

Why. In a Train worker the GPU stage runs beside the training step, and every piece of Python it
runs holds the GIL the step's own thread needs between its CUDA launches. nvImageCodec's Python
``Decoder.decode`` turns each of a batch's 256 arrays into a ``CodeStream`` object, builds or
reuses an ``Image`` object per sample and returns a list of them; we then read each image's
``__cuda_array_interface__``. A py-spy ``--gil`` profile of the consumer-stage probe (H200,
ResNet-18, 2026-12-02) put the decode call at 28 % and the pointer loop at 17 % of the GIL time
the stage took from the step. Here one C call, made through ``ctypes.CDLL`` (which releases the
GIL for it), parses the batch's code streams, describes each output image in a buffer we
allocated (one CuPy allocation per batch, offsets computed with NumPy) and decodes; its handles
are reused from batch to batch.

Build. The C file is compiled on first use with the system C compiler (``$CC``, else ``cc`` or
``gcc``) against the installed nvImageCodec wheel's ``include/nvimgcodec.h`` and its
``libnvimgcodec.so.0`` (the same library the Python module loaded), with a one-line stand-in for
the CUDA runtime header (`native_include`). The result is cached in
``$RAY_EXTSRC_CACHE_DIR`` (default ``~/.cache/ray_extsrc``) under a hash of the sources, so a
node builds it once. Where it cannot be built or loaded (no compiler, no header), `library`
returns None, `unavailable` says why, and the decoders keep nvImageCodec's Python API.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NativeDecoder", "library", "unavailable", "BACKEND_KINDS", "DEVICE_CPU_ONLY"]

_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE / "_batch_decode.c"
_STUB_INCLUDE = _HERE / "native_include"

#: nvimgcodecBackendKind_t values (nvimgcodec.h)
BACKEND_KINDS = {"cpu": 1, "cuda": 2, "hybrid": 3, "hw": 4}
#: NVIMGCODEC_DEVICE_CPU_ONLY: a decoder that touches no GPU (the CPU tests use it)
DEVICE_CPU_ONLY = -99999

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "lib", "instance", "error"

_P = ctypes.c_void_p
_ERRLEN = 512


def _package_dir() -> Path:
    from nvidia import nvimgcodec

    return Path(nvimgcodec.__file__).resolve().parent


def _cache_dir() -> Path:
    root = os.environ.get("RAY_EXTSRC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ray_extsrc")
    return Path(root) / "native"


def _build(pkg: Path) -> Path:
    """The compiled library for this nvImageCodec install (built now unless cached)."""
    header = pkg / "include" / "nvimgcodec.h"
    lib = pkg / "libnvimgcodec.so.0"
    for need in (header, lib):
        if not need.exists():
            raise RuntimeError(f"nvImageCodec's {need.name} is not at {need}")
    key = hashlib.sha256()
    for part in (_SOURCE, _STUB_INCLUDE / "cuda_runtime_api.h", header):
        key.update(part.read_bytes())
    key.update(str(lib).encode())
    out = _cache_dir() / f"batch_decode-{key.hexdigest()[:20]}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    cmd = [cc, "-O2", "-shared", "-fPIC", "-I", str(_STUB_INCLUDE), "-I", str(header.parent), "-o", str(tmp),
           str(_SOURCE), "-L", str(pkg), "-l:libnvimgcodec.so.0", f"-Wl,-rpath,{pkg}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{cc} failed to run: {e}") from e
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {_SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr.strip()[-2000:]}")
    os.replace(tmp, out)  # atomic: processes building at once each rename a complete file
    return out


def _bind(lib: ctypes.CDLL) -> None:
    lib.rx_instance_create.restype = _P
    lib.rx_instance_create.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.rx_decoder_create.restype = _P
    lib.rx_decoder_create.argtypes = [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_char_p,
                                      ctypes.c_char_p, ctypes.c_int]
    lib.rx_decoder_destroy.argtypes = [_P]
    lib.rx_decode.restype = ctypes.c_int
    lib.rx_decode.argtypes = [_P, ctypes.c_int, _P, _P, _P, _P, ctypes.c_int, _P, _P, ctypes.c_char_p, ctypes.c_int]


def library() -> Any:
    """``(ctypes library, nvImageCodec instance)`` for this process, built and made once; None
    where it cannot be (`unavailable` says why)."""
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")
        try:
            lib = ctypes.CDLL(str(_build(_package_dir())))
            _bind(lib)
            err = ctypes.create_string_buffer(_ERRLEN)
            instance = lib.rx_instance_create(err, _ERRLEN)
            if not instance:
                raise RuntimeError(err.value.decode(errors="replace"))
        except Exception as e:  # noqa: BLE001 - any failure: keep the Python API, say why
            _state["error"] = f"{type(e).__name__}: {e}"
            return None
        _state["lib"] = (lib, instance)  # the instance lives as long as the process
        return _state["lib"]


def unavailable() -> str | None:
    """Why `library` returned None (None when it has not failed)."""
    return _state.get("error")


class NativeDecoder:
    """One C-side nvImageCodec decoder (one thread uses it at a time); freed with the object.

    ``backends``: ``[(kind name of BACKEND_KINDS, load hint)]``; empty = nvImageCodec's defaults.
    """

    def __init__(self, device_id: int, backends: list[tuple[str, float]], cpu_threads: int = 0,
                 options: str = "") -> None:
        got = library()
        if got is None:
            raise RuntimeError(f"the native batch decoder is unavailable: {unavailable()}")
        self._lib, instance = got
        kinds = np.array([BACKEND_KINDS[k] for k, _ in backends] or [0], np.int32)
        hints = np.array([h for _, h in backends] or [0.0], np.float32)
        err = ctypes.create_string_buffer(_ERRLEN)
        self._handle = self._lib.rx_decoder_create(instance, device_id, cpu_threads, len(backends), kinds.ctypes.data,
                                                   hints.ctypes.data, options.encode(), err, _ERRLEN)
        if not self._handle:
            raise RuntimeError(f"could not create an nvImageCodec decoder on device {device_id} with backends "
                               f"{backends or 'default'}: {err.value.decode(errors='replace')}")
        self._err = err

    def decode(self, src: np.ndarray, lengths: np.ndarray, dst: np.ndarray, hw: np.ndarray, stream: int = 0,
               host_buffers: bool = False) -> np.ndarray:
        """Decode sample j (``lengths[j]`` bytes at host address ``src[j]``) as RGB uint8, rows of
        ``w * 3`` bytes, into the buffer at ``dst[j]`` (device memory, or host memory with
        ``host_buffers``), expecting ``hw[j] = (h, w)``, on CUDA stream ``stream``. The caller keeps
        every buffer alive. Returns per sample: 1 decoded, 0 not decoded, -1 not parsed, -2 not
        the expected size. Raises when the whole call failed."""
        n = len(src)
        src = np.ascontiguousarray(src, np.uint64)
        lengths = np.ascontiguousarray(lengths, np.uint64)
        dst = np.ascontiguousarray(dst, np.uint64)
        hw = np.ascontiguousarray(hw, np.int32).reshape(n, 2)
        result = np.empty(n, np.int32)
        if n == 0:
            return result
        rc = self._lib.rx_decode(self._handle, n, src.ctypes.data, lengths.ctypes.data, dst.ctypes.data,
                                 hw.ctypes.data, int(host_buffers), stream, result.ctypes.data, self._err, _ERRLEN)
        if rc != 0:
            raise RuntimeError(f"nvImageCodec batch decode of {n} samples failed: {self._err.value.decode(errors='replace')}"
                               " (the decoder option native_batch=False decodes through nvImageCodec's Python API instead)")
        return result

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.rx_decoder_destroy(handle)

    __del__ = close
