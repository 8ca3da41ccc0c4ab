"""``fn.decoders.*``: encoded bytes (1-D uint8) -> HWC uint8 images.

JPEG goes through libjpeg-turbo (simplejpeg); anything else (PNG, BMP, ...) through Pillow. On
``device="mixed"`` the GPU path (nvImageCodec) replaces ``run_cpu``; results match within a small
pixel tolerance. The GPU decoders' settings are a `DecoderOptions`, given to the op as keyword
arguments of the same names (``hw_decoder_load=0.8``, ``decode_threads=1``, ...) or whole
(``decoder_options=DecoderOptions(...)``), validated at construction and kept as
``op.decoder_options``.

``image_crop`` and ``image_slice`` decode the whole image and cut their region from it (the CPU
decoders have no region decode). On ``device="mixed"`` the whole image is decoded by the batched
GPU decode of ``decoders.image`` (worker prep, fallbacks and all), each sample's window is
computed on the host with the CPU op's own rules from the decoded size, and the crop is a moved
pointer into the decoded image (`_gpu.ops.crop_decoded`): no copy, no kernel.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import types
from ..graph import DataNode, Operator, SampleContext, add_op
from . import _args, _codec
from ._crop_spec import CropSpec
from ._random_crop_window import RandomCropArgs
from ._slice_spec import NAMED_ARGS, SliceSpec
from .decoder_options import OPTION_NAMES, DecoderOptions

__all__ = [
    "image", "image_random_crop", "image_crop", "image_slice",
    "ImageDecoder", "ImageRandomCropDecoder", "ImageCropDecoder", "ImageSliceDecoder",
]

# libjpeg-turbo scales 1/2, 1/4 and 1/8 with fast SIMD IDCTs; its other factors (7/8, 3/4, ...)
# were measured slower than decoding at full size, so they are never used.
_DCT_SCALE_DENOMS = (8, 4, 2)


class ImageDecoder(Operator):
    """``fn.decoders.image``: decode one encoded image to HWC uint8.

    ``decoder_options`` and the keyword arguments named in `DecoderOptions` (which override it)
    set the GPU decoders; they are checked here, whatever the device, and kept as
    ``self.decoder_options``.
    """

    name = "decoders.image"
    devices = ("cpu", "mixed")

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, output_type: Any = types.RGB,
        decoder_options: DecoderOptions | None = None, **options: Any,
    ) -> None:
        super().__init__(device, seed)
        self.output_type = _args.enum_value(self.name, "output_type", output_type, types.DALIImageType)
        self.decoder_options = DecoderOptions.for_op(self.name, decoder_options, **options)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        data = _codec.as_bytes(self.name, inputs[0], ctx)
        return _codec.decode(self.name, data, self.output_type, ctx)

    def worker_prep(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        """Per-sample host step of the GPU decode, run in the workers: ``[y, x, h, w, H, W, ok]``,
        the region to keep (the whole image here) and the size from the header; ``ok`` is 1 for a
        complete JPEG the GPU may decode, 0 for data the CPU decoder must judge."""
        return _prep_row(self, inputs[0], ctx, random_crop=False)

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> list:
        """Batched nvImageCodec decode (device="mixed"), see `_gpu.decode`."""
        from ._gpu import decode

        return decode.decode_batch(self, inputs[0], ctxs, stream, random_crop=False, prep=arg_inputs.get(decode.PREP_ARG))


class ImageRandomCropDecoder(ImageDecoder):
    """``fn.decoders.image_random_crop``: decode a random crop (RandomResizedCrop box) of the image.

    The box depends only on (seed, op, epoch, sample) and the image size read from the header, see
    `random_crop_window`. When `downscale_target` is set (the pipeline does so when the only
    consumer is a resize to a fixed size), JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT
    domain whenever the crop stays at least that large, and the output is the crop of the scaled
    image: smaller than the box, but at least ``downscale_target``.
    """

    name = "decoders.image_random_crop"
    is_random = True

    def __init__(
        self,
        device: str = "cpu",
        seed: int | None = None,
        *,
        output_type: Any = types.RGB,
        random_area: Any = (0.08, 1.0),
        random_aspect_ratio: Any = (3 / 4, 4 / 3),
        num_attempts: int = 10,
        decoder_options: DecoderOptions | None = None,
        **options: Any,
    ) -> None:
        super().__init__(device, seed, output_type=output_type, decoder_options=decoder_options, **options)
        crop = RandomCropArgs.parse(self.name, random_area, random_aspect_ratio, num_attempts)
        self.random_area = crop.random_area
        self.random_aspect_ratio = crop.random_aspect_ratio
        self.num_attempts = crop.num_attempts
        self._crop_args = crop
        self._downscale_target: tuple[int, int] | None = None

    @property
    def downscale_target(self) -> tuple[int, int] | None:
        """``(height, width)`` the consumer resizes to, or None to always decode at full size."""
        return self._downscale_target

    @downscale_target.setter
    def downscale_target(self, value: tuple[int, int] | None) -> None:
        if value is not None:
            h, w = value
            if not all(isinstance(v, (int, np.integer)) and v > 0 for v in (h, w)):
                raise ValueError(
                    f"fn.{self.name}: downscale_target must be (height, width) > 0; got {value!r}"
                )
            value = (int(h), int(w))
        self._downscale_target = value

    def crop_window(self, ctx: SampleContext, height: int, width: int) -> tuple[int, int, int, int]:
        """The sample's ``(y, x, h, w)`` box in full-resolution pixels."""
        return self._crop_args.window(ctx.rng(), height, width)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        data = _codec.as_bytes(self.name, inputs[0], ctx)
        header = _codec.read_header(self.name, data, ctx)
        box = self.crop_window(ctx, header.height, header.width)
        denom = self._scale_denom(header, box)
        img = _codec.decode(self.name, data, self.output_type, ctx, header, denom)
        if denom > 1 and img.shape[:2] != _scaled_size(header, denom):
            # libjpeg-turbo picked another factor (possible only for tiny images): start over.
            denom = 1
            img = _codec.decode(self.name, data, self.output_type, ctx, header)
        if img.shape[:2] != (header.height, header.width) and denom == 1:
            raise _codec.decode_error(
                self.name, data, ctx,
                f"header says {header.height}x{header.width} but decoded {img.shape[0]}x{img.shape[1]}",
            )
        y, x, h, w = _scale_box(box, denom, img.shape[0], img.shape[1])
        return np.ascontiguousarray(img[y : y + h, x : x + w])

    def worker_prep(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        """As `ImageDecoder.worker_prep`, with this sample's random crop box (same draws as run_cpu)."""
        return _prep_row(self, inputs[0], ctx, random_crop=True)

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> list:
        """Batched nvImageCodec decode of each sample's crop (see `_gpu.decode`)."""
        from ._gpu import decode

        return decode.decode_batch(self, inputs[0], ctxs, stream, random_crop=True, prep=arg_inputs.get(decode.PREP_ARG))

    def _scale_denom(self, header: _codec.Header, box: tuple[int, int, int, int]) -> int:
        if self._downscale_target is None or not header.is_jpeg:
            return 1
        th, tw = self._downscale_target
        for denom in _DCT_SCALE_DENOMS:  # largest reduction first
            sh, sw = _scaled_size(header, denom)
            _, _, h, w = _scale_box(box, denom, sh, sw)
            if h >= th and w >= tw:
                return denom
        return 1


class ImageCropDecoder(ImageDecoder):
    """``fn.decoders.image_crop``: decode, then keep a fixed-size window at a relative position
    (DALI's ``CropAttr``: ``crop = (h, w)`` or ``crop_h``/``crop_w``, anchored at
    ``round(crop_pos * (extent - crop))``, see `CropSpec`). A window that leaves the image is
    refused, as DALI's decoders do.

    The CPU path decodes the whole image and slices it (libjpeg-turbo through simplejpeg has no
    region decode); the GPU path decodes the whole image on the GPU and crops it there (see the
    module docstring).
    """

    name = "decoders.image_crop"

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, output_type: Any = types.RGB,
        crop: Any = None, crop_h: Any = None, crop_w: Any = None, crop_pos_x: Any = 0.5,
        crop_pos_y: Any = 0.5, decoder_options: DecoderOptions | None = None, **options: Any,
    ) -> None:
        super().__init__(device, seed, output_type=output_type, decoder_options=decoder_options, **options)
        self.crop = CropSpec.parse(self.name, crop, crop_h, crop_w, crop_pos_x, crop_pos_y, "error", 0)

    def window(
        self, height: int, width: int, inputs: Sequence[Any], arg_inputs: Mapping[str, Any]
    ) -> tuple[int, int, int, int]:
        """The sample's ``(y, x, h, w)`` in its ``height x width`` image; raises when it leaves it."""
        y, x, h, w = self.crop.window(self.name, height, width, arg_inputs)
        if y < 0 or x < 0 or y + h > height or x + w > width:
            raise ValueError(
                f"fn.{self.name}: crop window {h}x{w} does not fit the {height}x{width} image; the "
                "decoders refuse windows that leave the image, as DALI's do. Use a smaller crop, or "
                "decode with fn.decoders.image and pad with fn.crop(..., out_of_bounds_policy='pad')"
            )
        return y, x, h, w

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = ImageDecoder.run_cpu(self, inputs[:1], arg_inputs, ctx)
        y, x, h, w = self.window(img.shape[0], img.shape[1], inputs, arg_inputs)
        return np.ascontiguousarray(img[y : y + h, x : x + w])

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """Decode the whole images on the GPU, then crop each by moving its pointer."""
        return _decode_then_crop(self, inputs, arg_inputs, ctxs, stream)


class ImageSliceDecoder(ImageDecoder):
    """``fn.decoders.image_slice``: decode, then keep the region given by DALI's slice arguments
    (see `SliceSpec`): named ``start``/``rel_start`` with ``end``/``rel_end``/``shape``/``rel_shape``,
    or positional ``anchor`` and ``shape`` inputs, in ``axis_names`` order (default ``"WH"``).

    Decodes the whole image, then slices; on ``device="mixed"`` both on the GPU, as
    `ImageCropDecoder`.
    """

    name = "decoders.image_slice"

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, output_type: Any = types.RGB,
        positional: bool = False, start: Any = None, rel_start: Any = None, end: Any = None,
        rel_end: Any = None, shape: Any = None, rel_shape: Any = None, axes: Any = None,
        axis_names: Any = None, normalized_anchor: Any = None, normalized_shape: Any = None,
        decoder_options: DecoderOptions | None = None, **options: Any,
    ) -> None:
        super().__init__(device, seed, output_type=output_type, decoder_options=decoder_options, **options)
        named = dict(start=start, rel_start=rel_start, end=end, rel_end=rel_end, shape=shape, rel_shape=rel_shape)
        self.slice = SliceSpec.parse(
            self.name, positional, named, axes, axis_names, normalized_anchor, normalized_shape
        )
        self.positional = positional

    def window(
        self, height: int, width: int, inputs: Sequence[Any], arg_inputs: Mapping[str, Any]
    ) -> tuple[int, int, int, int]:
        """The sample's ``(y, x, h, w)`` (``inputs``: the sample's encoded data, then the
        positional anchor and shape when given); raises when it leaves the image."""
        anchor, shape = (inputs[1], inputs[2]) if self.positional else (None, None)
        return self.slice.window(self.name, height, width, arg_inputs, anchor, shape)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = ImageDecoder.run_cpu(self, inputs[:1], arg_inputs, ctx)
        y, x, h, w = self.window(img.shape[0], img.shape[1], inputs, arg_inputs)
        return np.ascontiguousarray(img[y : y + h, x : x + w])

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """Decode the whole images on the GPU, then cut each region by moving its pointer."""
        return _decode_then_crop(self, inputs, arg_inputs, ctxs, stream)


_whole_lock = threading.Lock()
#: region decoder op -> the `ImageDecoder` that decodes its whole images on the GPU
_whole_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _whole_decoder(op: ImageDecoder) -> ImageDecoder:
    """A plain `ImageDecoder` with ``op``'s output type, decoder options and name (so errors name
    ``op``): `_gpu.decode` decodes whole images through it, and its CPU fallback decodes whole
    images too. One per op, kept outside the op (the decode path hangs CUDA events on it, which
    must not travel when the op is pickled)."""
    with _whole_lock:
        whole = _whole_decoders.get(op)
        if whole is None:
            whole = ImageDecoder(op.device, op.seed, output_type=op.output_type, decoder_options=op.decoder_options)
            whole.name = op.name
            _whole_decoders[op] = whole
        return whole


def _decode_then_crop(
    op: ImageCropDecoder | ImageSliceDecoder, inputs: Sequence[Any], arg_inputs: Mapping[str, Any],
    ctxs: Sequence[SampleContext], stream: Any,
) -> Any:
    import cupy

    from ._gpu import decode, ops

    if op.output_type is not types.RGB:
        # The GPU decode handles RGB JPEGs only, and its pointer batches are 3-channel: other
        # output types are decoded (and cut) by the CPU implementation, then copied to the GPU.
        return [
            cupy.asarray(op.run_cpu([x[j] for x in inputs], _row(arg_inputs, j), ctx))
            for j, ctx in enumerate(ctxs)
        ]
    prep = arg_inputs.get(decode.PREP_ARG)
    whole = decode.decode_batch(_whole_decoder(op), inputs[0], ctxs, stream, random_crop=False, prep=prep)
    sizes = ops.image_sizes(whole)
    windows = [op.window(h, w, [x[j] for x in inputs], _row(arg_inputs, j)) for j, (h, w) in enumerate(sizes)]
    return ops.crop_decoded(whole, windows)


def _row(arg_inputs: Mapping[str, Sequence[Any]], j: int) -> dict[str, Any]:
    from ._gpu.ptrbatch import PREP_ARG

    return {k: v[j] for k, v in arg_inputs.items() if k != PREP_ARG}


def _scaled_size(header: _codec.Header, denom: int) -> tuple[int, int]:
    return -(-header.height // denom), -(-header.width // denom)


def _scale_box(
    box: tuple[int, int, int, int], denom: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """Map a full-resolution box onto a 1/denom image (scaled pixel i covers [i*d, (i+1)*d))."""
    if denom == 1:
        return box
    y, x, h, w = box
    y0 = min(height - 1, _args.round_half_away(y / denom))
    x0 = min(width - 1, _args.round_half_away(x / denom))
    y1 = max(y0 + 1, min(height, _args.round_half_away((y + h) / denom)))
    x1 = max(x0 + 1, min(width, _args.round_half_away((x + w) / denom)))
    return y0, x0, y1 - y0, x1 - x0


_IMAGE_ARGS = ("device", "output_type", "seed", "decoder_options", *OPTION_NAMES)


def _decoder_kwargs(op_name: str, supported: Sequence[str], extra: dict[str, Any]) -> dict[str, Any]:
    """Split ``extra`` keyword arguments into decoder options (returned) and unknown names (refused
    by name, never swallowed)."""
    options = {k: extra.pop(k) for k in OPTION_NAMES if k in extra}
    _args.reject_unsupported(op_name, extra, supported)
    return options


def image(
    data: DataNode, *, device: str = "cpu", output_type: Any = types.RGB, seed: int | None = None,
    decoder_options: DecoderOptions | None = None, **options: Any,
) -> DataNode:
    """Decode images (DALI's ``fn.decoders.image``). ``device`` is "cpu" or "mixed".

    GPU decoder settings: ``decoder_options`` and/or the `DecoderOptions` fields as keyword
    arguments (DALI's ``hw_decoder_load``, ...); any other keyword raises ``TypeError``."""
    options = _decoder_kwargs(ImageDecoder.name, _IMAGE_ARGS, options)
    consts, nodes = _args.split_args(
        ImageDecoder.name, (), output_type=output_type, decoder_options=decoder_options, **options
    )
    return add_op(ImageDecoder(device, seed, **consts), data, **nodes)


def image_random_crop(
    data: DataNode,
    *,
    device: str = "cpu",
    output_type: Any = types.RGB,
    random_area: Any = (0.08, 1.0),
    random_aspect_ratio: Any = (3 / 4, 4 / 3),
    num_attempts: int = 10,
    seed: int | None = None,
    decoder_options: DecoderOptions | None = None,
    **options: Any,
) -> DataNode:
    """Decode a random crop of each image (DALI's ``fn.decoders.image_random_crop``); decoder
    settings as for `image`."""
    options = _decoder_kwargs(
        ImageRandomCropDecoder.name,
        (*_IMAGE_ARGS, "random_area", "random_aspect_ratio", "num_attempts"), options,
    )
    consts, nodes = _args.split_args(
        ImageRandomCropDecoder.name, (), output_type=output_type, random_area=random_area,
        random_aspect_ratio=random_aspect_ratio, num_attempts=num_attempts,
        decoder_options=decoder_options, **options,
    )
    return add_op(ImageRandomCropDecoder(device, seed, **consts), data, **nodes)


def image_crop(
    data: DataNode, *, device: str = "cpu", output_type: Any = types.RGB, crop: Any = None,
    crop_h: Any = None, crop_w: Any = None, crop_pos_x: Any = 0.5, crop_pos_y: Any = 0.5,
    seed: int | None = None, decoder_options: DecoderOptions | None = None, **options: Any,
) -> DataNode:
    """Decode each image and keep a ``crop = (h, w)`` window at ``crop_pos_x/y`` (DALI's
    ``fn.decoders.image_crop``); ``crop_h``/``crop_w``/``crop_pos_x``/``crop_pos_y`` may be
    per-sample DataNodes. Decoder settings as for `image`."""
    names = ("crop", "crop_h", "crop_w", "crop_pos_x", "crop_pos_y")
    options = _decoder_kwargs(ImageCropDecoder.name, (*_IMAGE_ARGS, *names), options)
    consts, nodes = _args.split_args(
        ImageCropDecoder.name, ("crop_h", "crop_w", "crop_pos_x", "crop_pos_y"),
        output_type=output_type, crop=crop, crop_h=crop_h, crop_w=crop_w, crop_pos_x=crop_pos_x,
        crop_pos_y=crop_pos_y, decoder_options=decoder_options, **options,
    )
    return add_op(ImageCropDecoder(device, seed, **consts), data, **nodes)


def image_slice(
    data: DataNode, anchor: DataNode | None = None, shape_input: DataNode | None = None, /, *,
    device: str = "cpu", output_type: Any = types.RGB, start: Any = None, rel_start: Any = None,
    end: Any = None, rel_end: Any = None, shape: Any = None, rel_shape: Any = None,
    axes: Any = None, axis_names: Any = None, normalized_anchor: Any = None,
    normalized_shape: Any = None, seed: int | None = None,
    decoder_options: DecoderOptions | None = None, **options: Any,
) -> DataNode:
    """Decode each image and keep a region (DALI's ``fn.decoders.image_slice``): two positional
    inputs ``(anchor, shape)``, or the named ``start``/``rel_start``/``end``/``rel_end``/``shape``/
    ``rel_shape`` (per-sample DataNodes allowed), in ``axis_names`` order (default ``"WH"``).
    Decoder settings as for `image`."""
    op_name = ImageSliceDecoder.name
    positional = anchor is not None or shape_input is not None
    for what, x in (("data", data), ("anchor", anchor), ("shape", shape_input)):
        if (x is not None or what == "data" or positional) and not isinstance(x, DataNode):
            raise TypeError(
                f"fn.{op_name}: positional input {what} must be a DataNode (anchor and shape come "
                f"together); got {type(x).__name__}"
            )
    if not positional and (normalized_anchor is not None or normalized_shape is not None):
        warnings.warn(  # DALI warns too
            f"fn.{op_name}: normalized_anchor/normalized_shape only apply to the positional anchor "
            "and shape inputs; they have no effect on named slice arguments",
            UserWarning, stacklevel=2,
        )
    names = (*NAMED_ARGS, "axes", "axis_names", "normalized_anchor", "normalized_shape")
    options = _decoder_kwargs(op_name, (*_IMAGE_ARGS, *names), options)
    consts, nodes = _args.split_args(
        op_name, NAMED_ARGS, output_type=output_type, start=start, rel_start=rel_start, end=end,
        rel_end=rel_end, shape=shape, rel_shape=rel_shape, axes=axes, axis_names=axis_names,
        normalized_anchor=normalized_anchor, normalized_shape=normalized_shape,
        decoder_options=decoder_options, **options,
    )
    inputs = (data, anchor, shape_input) if positional else (data,)
    return add_op(ImageSliceDecoder(device, seed, positional=positional, **consts), *inputs, **nodes)


def _prep_row(op: ImageDecoder, raw: np.ndarray, ctx: SampleContext, random_crop: bool) -> np.ndarray:
    """``[y, x, h, w, H, W, ok]`` for the GPU decoder (see `ImageDecoder.worker_prep`)."""
    try:
        data = _codec.as_bytes(op.name, raw, ctx)
        header = _codec.read_header(op.name, data, ctx)
    except Exception:  # noqa: BLE001 - the CPU decoder will raise the sample's DecodeError
        return np.zeros(7, np.int32)
    H, W = header.height, header.width
    y, x, h, w = op.crop_window(ctx, H, W) if random_crop else (0, 0, H, W)
    ok = int(header.is_jpeg and _codec.is_complete_jpeg(data) and op.output_type is types.RGB)
    return np.array([y, x, h, w, H, W, ok], np.int32)
