"""Turning encoded bytes into HWC uint8 images: libjpeg-turbo (simplejpeg) for JPEG, Pillow otherwise.

Every failure becomes an `errors.DecodeError` that names the sample and says what to check, because
the traceback of a worker process is far from the file that caused it.

Truncated JPEGs: libjpeg-turbo treats a missing end of data as a *warning* ("Premature end of JPEG
file") and fills the rest of the image with grey. simplejpeg's ``strict=True`` (its default, passed
explicitly here so a changed default cannot weaken it) turns such warnings into errors, so a
truncated file is refused rather than silently half grey.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from .. import types
from ..errors import DecodeError
from ..graph import SampleContext

_SIMPLEJPEG_COLORSPACE = {types.RGB: "RGB", types.BGR: "BGR", types.GRAY: "GRAY"}


@dataclass(frozen=True, slots=True)
class Header:
    """What the header says: size, and whether libjpeg-turbo decodes it (``is_jpeg``).

    libjpeg-turbo also converts CMYK/YCCK JPEGs to RGB (checked against Pillow), so every JPEG
    takes that path.
    """

    height: int
    width: int
    is_jpeg: bool


def as_bytes(op_name: str, data: np.ndarray, ctx: SampleContext) -> np.ndarray:
    """Check that ``data`` is encoded bytes (1-D uint8, non-empty); return it C-contiguous."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, np.uint8)
    a = np.asarray(data)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise DecodeError(
            f"sample idx_in_epoch={ctx.idx_in_epoch} (epoch {ctx.epoch_idx}): fn.{op_name} expects "
            f"the encoded file as a 1-D uint8 array; got a {a.dtype} array of shape {a.shape}. "
            "Have the source return np.frombuffer(file_bytes, dtype=np.uint8)."
        )
    if a.size == 0:
        raise decode_error(op_name, a, ctx, "the data is empty")
    return np.ascontiguousarray(a)


def read_header(op_name: str, data: np.ndarray, ctx: SampleContext) -> Header:
    """Image size from the header only (no pixel decoding)."""
    if _is_jpeg(data):
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data, strict=True)
        except ValueError as exc:
            raise decode_error(op_name, data, ctx, str(exc)) from exc
        return Header(h, w, True)
    try:
        with Image.open(io.BytesIO(data.data)) as im:  # lazy: reads the header only
            w, h = im.size
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise decode_error(op_name, data, ctx, f"{type(exc).__name__}: {exc}") from exc
    return Header(h, w, False)


def decode(
    op_name: str,
    data: np.ndarray,
    output_type: types.DALIImageType,
    ctx: SampleContext,
    header: Header | None = None,
    scale_denom: int = 1,
) -> np.ndarray:
    """Decode to HWC uint8 (C = 3 for RGB/BGR, 1 for GRAY).

    ``scale_denom`` (1, 2, 4 or 8) asks libjpeg-turbo for a 1/scale_denom image, scaled in the DCT
    domain (cheaper than decoding at full size); the result is ceil(H/d) x ceil(W/d). Ignored for
    non-JPEG data (the caller must check the returned shape).
    """
    if header is None:
        header = Header(0, 0, _is_jpeg(data))
    if header.is_jpeg:
        kwargs = {}
        if scale_denom > 1:
            # The smallest libjpeg-turbo scale whose output is >= these bounds is exactly 1/d.
            kwargs = dict(
                min_height=-(-header.height // scale_denom), min_width=-(-header.width // scale_denom)
            )
        try:
            img = simplejpeg.decode_jpeg(
                data, colorspace=_SIMPLEJPEG_COLORSPACE[output_type], strict=True, **kwargs
            )
        except ValueError as exc:
            raise decode_error(op_name, data, ctx, str(exc)) from exc
        return img  # simplejpeg returns a fresh C-contiguous HWC array (HxWx1 for GRAY)
    return _decode_pillow(op_name, data, output_type, ctx)


def _decode_pillow(
    op_name: str, data: np.ndarray, output_type: types.DALIImageType, ctx: SampleContext
) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data.data)) as im:
            im.load()  # raises on truncated/corrupt data (unless the user set LOAD_TRUNCATED_IMAGES)
            im = im.convert("L" if output_type is types.GRAY else "RGB")
            img = np.asarray(im)
    except Exception as exc:
        raise decode_error(op_name, data, ctx, f"{type(exc).__name__}: {exc}") from exc
    if output_type is types.GRAY:
        return img[:, :, None]
    if output_type is types.BGR:
        return np.ascontiguousarray(img[:, :, ::-1])
    return img


def _is_jpeg(data: np.ndarray) -> bool:
    return data.size >= 2 and data[0] == 0xFF and data[1] == 0xD8


def is_complete_jpeg(data: np.ndarray) -> bool:
    """A JPEG that starts with SOI and ends with its EOI marker. nvJPEG decodes a truncated file
    without complaint (grey rest), libjpeg-turbo in strict mode refuses it: the GPU decoders send
    anything else to the CPU decoder, which decodes it or names it in a DecodeError."""
    n = data.size
    return n >= 4 and _is_jpeg(data) and data[2] == 0xFF and data[n - 2] == 0xFF and data[n - 1] == 0xD9


def decode_error(op_name: str, data: np.ndarray, ctx: SampleContext, reason: str) -> DecodeError:
    head = bytes(data[:8]).hex(" ")
    kind = "JPEG" if _is_jpeg(data) else "image"
    return DecodeError(
        f"sample idx_in_epoch={ctx.idx_in_epoch} (epoch {ctx.epoch_idx}): cannot decode "
        f"{data.size} bytes as {kind} in fn.{op_name} (first bytes: {head or 'none'}): {reason}. "
        "Check that the file behind this sample is complete and not corrupt, and that the source "
        "returns the whole file's bytes (JPEG, PNG, BMP, ...).",
        idx_in_epoch=ctx.idx_in_epoch,
        epoch_idx=ctx.epoch_idx,
    )
