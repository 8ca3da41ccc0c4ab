"""`DecoderOptions`: the settings of the GPU image decoders (``device="mixed"``), given to the op.

The decoder ops (``fn.decoders.image``, ``fn.decoders.image_random_crop``) take each field as a
keyword argument of the same name (DALI's name where DALI has one: ``hw_decoder_load``), or a whole
``decoder_options=DecoderOptions(...)``; the op validates them once, at construction, and keeps
them as ``op.decoder_options``. The GPU decode path (`_gpu.decode`) reads them from the op; nothing
is read from the environment. The CPU path ignores them.

This module is CPU-only (no CuPy, no nvImageCodec): options are built and checked where the
pipeline is defined, which may be a machine without a GPU.

The defaults are those of the environment variables these fields replace (``RAY_EXTSRC_DECODER``,
``RAY_EXTSRC_HW_LOAD``, ``RAY_EXTSRC_HW_SHARE``, ``RAY_EXTSRC_SPLIT_KIND``,
``RAY_EXTSRC_DECODE_THREADS``, ``RAY_EXTSRC_NVIMGCODEC_THREADS``, ``RAY_EXTSRC_GPU_ROI``,
``RAY_EXTSRC_DECODE_CHUNK``, ``RAY_EXTSRC_NVIMGCODEC_OPTIONS``). ``RAY_EXTSRC_GPU_ROI`` had two
effects with two defaults (prepared path on, region decode on the host path on); it is split into
`use_worker_prep` and `roi`, whose defaults keep both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = ["DecoderOptions", "BACKENDS", "SPLIT_BACKENDS", "OPTION_NAMES"]

#: nvImageCodec backend sets for `DecoderOptions.backend`.
BACKENDS = ("default", "hw", "cuda", "hybrid", "hwload")
#: Backends for the second decoder of a split batch (`DecoderOptions.split_backend`).
SPLIT_BACKENDS = ("hybrid", "cuda")
#: nvImageCodec's own default for its nvJPEG CUDA decoder's ``hybrid_huffman_threshold`` (pixels).
_NVIMGCODEC_HUFFMAN_THRESHOLD = 1_000_000


@dataclass(frozen=True)
class DecoderOptions:
    """Typed, validated settings of the GPU (nvImageCodec) decoders; frozen, picklable.

    Bad values raise ``ValueError`` naming the argument, the value and what is allowed.
    """

    #: nvImageCodec backends for a whole batch: "default" (its default backends: the hardware JPEG
    #: engine where the GPU has one, then the CUDA/hybrid decoders), "hw" (hardware engine only),
    #: "cuda" (nvJPEG's CUDA decoder; nvImageCodec 0.9 on an H100 refused to create it alone),
    #: "hybrid" (CPU Huffman + GPU IDCT), "hwload" (hardware engine for `hw_decoder_load` of each
    #: batch, the CUDA then hybrid decoders for the rest).
    backend: str = "default"
    #: DALI's name: the share of each batch for the hardware engine, with ``backend="hwload"``.
    hw_decoder_load: float = 0.65
    #: The share of each batch for a hardware-engine-only decoder, the rest going at the same time
    #: to a second decoder (`split_backend`); 0 = off (one decoder, `backend`, for the whole batch).
    #: With a split, twice `decode_threads` threads run.
    split_share: float = 0.0
    #: The second decoder of a split batch: "hybrid" or "cuda".
    split_backend: str = "hybrid"
    #: Decode threads of the process (per device): each has its own decoders and CUDA stream, so
    #: that many batches decode at once.
    decode_threads: int = 2
    #: nvImageCodec's ``max_num_cpu_threads`` per decoder (0 = its default).
    cpu_threads: int = 0
    #: Use the workers' prepared rows (header sizes, crop boxes) when the pipeline has them: whole
    #: images are decoded and each crop is a pointer into its image. False = always take the host
    #: path (the host parses headers and draws boxes), as ``RAY_EXTSRC_GPU_ROI=1`` did.
    use_worker_prep: bool = True
    #: On the host path (no workers' prep, or `use_worker_prep` False): decode only each crop's
    #: region (nvImageCodec ``Region``). False = decode the whole image and view the crop, as
    #: ``RAY_EXTSRC_GPU_ROI=0`` did there.
    roi: bool = True
    #: On the host path: samples per nvImageCodec call; while one chunk decodes, the host
    #: prepares the next.
    chunk: int = 256
    #: Extra nvImageCodec decoder options (space-separated, nvImageCodec's format); the default
    #: asks nvJPEG for libjpeg-turbo's chroma upsampling, so the GPU and CPU paths agree within a
    #: pixel or two. An option the installed nvImageCodec rejects falls back to its defaults.
    codec_options: str = ":fancy_upsampling=1"
    #: DALI's name and default: images of more pixels (height x width) than this go to nvJPEG's
    #: GPU Huffman decoder when the CUDA ("hybrid") decoder gets them; smaller ones have their
    #: Huffman stage decoded on the CPU (nvImageCodec's threads). 0 = every image on the GPU. It
    #: only matters for images that do not go to the hardware engine (``backend="hybrid"``,
    #: ``"hwload"``, a `split_share`, or images the engine refuses).
    hybrid_huffman_threshold: int = _NVIMGCODEC_HUFFMAN_THRESHOLD
    #: On the prepared path through nvImageCodec's Python API (`native_batch` False or unavailable,
    #: or a `split_share`): how many decoded images (nvImageCodec ``Image`` objects and their GPU
    #: buffers) the process keeps per device to decode the next batches into, instead of making
    #: and freeing every image (Python objects made with the GIL held, which a training step in the
    #: same process waits for); -1 = four batches' worth, 0 = off. A batch's images go back only
    #: after the GPU has passed its last kernel, and only if no view of them left the batch.
    #: Measured on an H200 (2026-12-02, the consumer-stage probe: one process, no Ray, one run):
    #: ResNet-50 fed 0.90x -> 0.97x of synthetic, ResNet-18 0.67x -> 0.73x.
    reuse_images: int = -1
    #: On the prepared path with one decoder per batch (no `split_share`): decode the batch in one
    #: call into a small C helper over nvImageCodec's C API (`fn._gpu.native_decode`, compiled on
    #: first use with the system C compiler), which parses, describes and decodes every sample
    #: without the GIL and without a Python object per sample; the output goes to one buffer per
    #: batch and the crops' pointer table is computed with NumPy. Where the helper cannot be built
    #: (no compiler), a warning says so and nvImageCodec's Python API is used. False = always the
    #: Python API (with `reuse_images`).
    native_batch: bool = True

    def __post_init__(self) -> None:
        for name, value in _checked("DecoderOptions", _as_dict(self)).items():
            object.__setattr__(self, name, value)

    @classmethod
    def for_op(cls, op_name: str, base: Any = None, **kwargs: Any) -> DecoderOptions:
        """Options from an op's arguments: ``base`` (a `DecoderOptions`, or None for the defaults)
        with the keyword arguments on top. Errors are prefixed ``fn.<op_name>:``; an unknown name
        raises ``TypeError`` naming it."""
        unknown = sorted(set(kwargs) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"fn.{op_name}: unknown decoder option(s) {', '.join(map(repr, unknown))}; "
                f"the options are {', '.join(OPTION_NAMES)}"
            )
        if base is None:
            base = cls()
        elif not isinstance(base, DecoderOptions):
            raise ValueError(
                f"fn.{op_name}: decoder_options must be a DecoderOptions or None; got {base!r}"
            )
        return cls(**_checked(f"fn.{op_name}", {**_as_dict(base), **kwargs}))

    def codec_option_text(self) -> str:
        """The options string nvImageCodec's decoders are made with: `codec_options`, plus the CUDA
        decoder's ``hybrid_huffman_threshold`` where it is not nvImageCodec's default (1,000,000)."""
        if self.hybrid_huffman_threshold == _NVIMGCODEC_HUFFMAN_THRESHOLD:
            return self.codec_options
        extra = f"nvjpeg_cuda_decoder:hybrid_huffman_threshold={self.hybrid_huffman_threshold}"
        return f"{self.codec_options} {extra}".strip()

    def replace(self, **changes: Any) -> DecoderOptions:
        """A copy with ``changes`` (validated)."""
        return DecoderOptions(**{**_as_dict(self), **changes})


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(DecoderOptions))


def _as_dict(options: DecoderOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in OPTION_NAMES}


def _checked(where: str, values: dict[str, Any]) -> dict[str, Any]:
    """Validated, normalized field values (ints as int, shares as float, flags as bool)."""
    return {
        "backend": _choice(where, "backend", values["backend"], BACKENDS),
        "hw_decoder_load": _share(where, "hw_decoder_load", values["hw_decoder_load"], upper_open=False),
        "split_share": _share(where, "split_share", values["split_share"], upper_open=True),
        "split_backend": _choice(where, "split_backend", values["split_backend"], SPLIT_BACKENDS),
        "decode_threads": _integer(where, "decode_threads", values["decode_threads"], 1),
        "cpu_threads": _integer(where, "cpu_threads", values["cpu_threads"], 0),
        "use_worker_prep": _flag(where, "use_worker_prep", values["use_worker_prep"]),
        "roi": _flag(where, "roi", values["roi"]),
        "chunk": _integer(where, "chunk", values["chunk"], 1),
        "codec_options": _text(where, "codec_options", values["codec_options"]),
        "hybrid_huffman_threshold": _integer(where, "hybrid_huffman_threshold", values["hybrid_huffman_threshold"], 0),
        "reuse_images": _integer(where, "reuse_images", values["reuse_images"], -1),
        "native_batch": _flag(where, "native_batch", values["native_batch"]),
    }


def _choice(where: str, name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{where}: {name} must be one of {allowed}; got {value!r}")
    return value


def _share(where: str, name: str, value: Any, upper_open: bool) -> float:
    interval = "[0, 1)" if upper_open else "[0, 1]"
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    v = float(value) if ok else math.nan
    if not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):
        raise ValueError(f"{where}: {name} must be a number in {interval}; got {value!r}")
    return v


def _integer(where: str, name: str, value: Any, minimum: int) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _flag(where: str, name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{where}: {name} must be a bool (True or False); got {value!r}")


def _text(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a str (nvImageCodec's options format); got {value!r}")
    return value
