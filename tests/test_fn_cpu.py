"""CPU implementations of the fn.* ops: real JPEG/PNG files, real decoders, NumPy references."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ray_extsrc import fn, types
from ray_extsrc.errors import DecodeError
from ray_extsrc.fn.decoders import ImageDecoder, ImageRandomCropDecoder
from ray_extsrc.fn.image import BrightnessContrast, Crop, CropMirrorNormalize, Flip, Resize
from ray_extsrc.fn.random import CoinFlip, Uniform
from ray_extsrc.graph import Graph, SampleContext, graph_scope

pytestmark = pytest.mark.timeout(60)


# --- helpers ---------------------------------------------------------------------------------------


def ctx(idx: int = 0, epoch: int = 0, seed: int = 1234, op_key: int = 7) -> SampleContext:
    return SampleContext(
        seed=seed, op_key=op_key, epoch_idx=epoch, idx_in_epoch=idx, idx_in_batch=0, iteration=0
    )


def run(op, *inputs, c=None, **arg_inputs):
    """Run one sample through ``op.run_cpu``; every op must return a C-contiguous array."""
    out = op.run_cpu(list(inputs), {k: np.asarray(v) for k, v in arg_inputs.items()}, c or ctx())
    assert isinstance(out, np.ndarray) and out.flags.c_contiguous
    return out


def picture(h: int = 300, w: int = 400) -> np.ndarray:
    """Gradients plus a few shapes, so crops and flips are checkable by content."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + 2 * yy) * 255 // (w + 2 * h)], -1)
    im = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.rectangle([w // 8, h // 6, w // 3, h // 2], fill=(250, 20, 30))
    draw.ellipse([w // 2, h // 2, w - w // 8, h - h // 10], fill=(20, 30, 240))
    return np.asarray(im).copy()


def encode(img: np.ndarray, fmt: str = "JPEG", tmp_path=None, **save_kwargs) -> np.ndarray:
    """Write ``img`` as a real file (in tmp_path when given) and return its bytes as uint8."""
    buf = io.BytesIO()
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    Image.fromarray(img).save(buf, format=fmt, **save_kwargs)
    data = buf.getvalue()
    if tmp_path is not None:
        path = tmp_path / f"img.{fmt.lower()}"
        path.write_bytes(data)
        data = path.read_bytes()
    return np.frombuffer(data, np.uint8)


def pillow_decode(data: np.ndarray, mode: str = "RGB") -> np.ndarray:
    with Image.open(io.BytesIO(data.tobytes())) as im:
        im.draft(mode, im.size)  # for "L": let libjpeg output luma, as our GRAY decode does
        return np.asarray(im.convert(mode))


def build(call):
    """Build an op through its public ``fn.*`` function (as a pipeline definition would)."""
    with graph_scope(Graph()) as g:
        placeholder = fn.random.uniform()
        call(placeholder)
        return g.nodes[-1]


@pytest.fixture
def jpeg(tmp_path):
    img = picture()
    return img, encode(img, "JPEG", tmp_path, quality=95)


# --- decoders --------------------------------------------------------------------------------------


def test_decode_jpeg_matches_pillow(jpeg):
    img, data = jpeg
    out = run(ImageDecoder(), data)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - pillow_decode(data)).max() <= 2
    assert np.abs(out.astype(int) - img).mean() < 3  # and it is the picture we encoded


def test_decode_gray_and_bgr(jpeg):
    _, data = jpeg
    rgb = run(ImageDecoder(), data)
    np.testing.assert_array_equal(run(ImageDecoder(output_type=types.BGR), data), rgb[:, :, ::-1])
    gray = run(ImageDecoder(output_type=types.GRAY), data)
    assert gray.shape == (*rgb.shape[:2], 1)
    assert np.abs(gray[:, :, 0].astype(int) - pillow_decode(data, "L")).max() <= 2


def test_decode_grayscale_jpeg_to_rgb(tmp_path):
    gray = picture()[:, :, 1]
    data = encode(gray, "JPEG", tmp_path, quality=95)
    out = run(ImageDecoder(), data)
    assert out.shape == (*gray.shape, 3)
    assert np.abs(out.astype(int) - gray[:, :, None]).mean() < 2


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_non_jpeg_falls_back_to_pillow(tmp_path, fmt):
    img = picture(50, 70)
    data = encode(img, fmt, tmp_path)
    np.testing.assert_array_equal(run(ImageDecoder(), data), img)
    np.testing.assert_array_equal(run(ImageDecoder(output_type="BGR"), data), img[:, :, ::-1])
    assert run(ImageDecoder(output_type=types.GRAY), data).shape == (50, 70, 1)


def test_corrupt_jpeg_names_the_sample(jpeg):
    _, data = jpeg
    corrupt = data.copy()
    corrupt[2:400] = 0x55  # SOI kept, headers destroyed
    with pytest.raises(DecodeError, match=r"sample idx_in_epoch=17 \(epoch 3\): cannot decode") as info:
        run(ImageDecoder(), corrupt, c=ctx(idx=17, epoch=3))
    assert f"{corrupt.size} bytes" in str(info.value) and "Check" in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_truncated_jpeg_is_refused_not_grey(jpeg, keep):
    # libjpeg-turbo would pad a truncated scan with grey; strict decoding must refuse it instead.
    _, data = jpeg
    cut = data[: int(data.size * keep)] if keep > 0 else data[:keep]
    for op in (ImageDecoder(), ImageRandomCropDecoder()):
        with pytest.raises(DecodeError, match="idx_in_epoch=5"):
            run(op, cut, c=ctx(idx=5))


def test_truncated_png_is_refused(tmp_path):
    data = encode(picture(60, 60), "PNG", tmp_path)
    with pytest.raises(DecodeError, match="idx_in_epoch=2"):
        run(ImageDecoder(), data[: data.size // 2], c=ctx(idx=2))


@pytest.mark.parametrize(
    "bad", [np.zeros(0, np.uint8), np.zeros((4, 4), np.uint8), np.zeros(8, np.float32)]
)
def test_decoder_rejects_non_bytes(bad):
    with pytest.raises(DecodeError, match="idx_in_epoch=9"):
        run(ImageDecoder(), bad, c=ctx(idx=9))


def test_random_crop_decoder_is_decode_then_slice(jpeg):
    _, data = jpeg
    full = run(ImageDecoder(), data)
    op = ImageRandomCropDecoder()
    for idx in range(10):
        c = ctx(idx=idx)
        y, x, h, w = op.crop_window(c, *full.shape[:2])
        np.testing.assert_array_equal(run(op, data, c=c), full[y : y + h, x : x + w])


def test_worker_prep_gives_the_gpu_decoder_the_cpu_crop_box(jpeg, tmp_path):
    """The GPU decoders read [y, x, h, w, H, W, ok] drawn in the workers: the same box the CPU op
    crops, and ok=0 (CPU fallback) for truncated or non-JPEG data."""
    _, data = jpeg
    op = ImageRandomCropDecoder()
    for idx in range(5):
        c = ctx(idx=idx)
        row = op.worker_prep([data], {}, c)
        crop = run(op, data, c=c)
        assert row[6] == 1 and tuple(row[2:4]) == crop.shape[:2]
        assert tuple(row[:4]) == op.crop_window(c, int(row[4]), int(row[5]))
    assert op.worker_prep([data[: data.size // 2]], {}, ctx())[6] == 0
    assert op.worker_prep([encode(picture(16, 16), "PNG", tmp_path)], {}, ctx())[6] == 0


def test_random_crop_decoder_works_for_png(tmp_path):
    img = picture(80, 120)
    data = encode(img, "PNG", tmp_path)
    op = ImageRandomCropDecoder()
    op.downscale_target = (8, 8)  # ignored for non-JPEG: full resolution
    y, x, h, w = op.crop_window(ctx(), 80, 120)
    np.testing.assert_array_equal(run(op, data), img[y : y + h, x : x + w])


def test_downscaled_random_crop_is_large_enough_and_same_content(tmp_path):
    img = picture(480, 640)
    data = encode(img, "JPEG", tmp_path, quality=90)
    full_op = ImageRandomCropDecoder(random_area=(0.3, 1.0))
    small_op = ImageRandomCropDecoder(random_area=(0.3, 1.0))
    target = (64, 48)
    small_op.downscale_target = target
    reductions = []
    for idx in range(12):
        c = ctx(idx=idx)
        full, small = run(full_op, data, c=c), run(small_op, data, c=c)
        assert small.shape[0] >= target[0] and small.shape[1] >= target[1]
        reductions.append(full.shape[0] / small.shape[0])
        a = np.asarray(Image.fromarray(full).resize(target[::-1], Image.BILINEAR), dtype=float)
        b = np.asarray(Image.fromarray(small).resize(target[::-1], Image.BILINEAR), dtype=float)
        assert np.abs(a - b).mean() < 4, idx
    # crops of >= 30% of 480x640 are >= 4x the target: libjpeg-turbo's 1/4 or 1/8 scale was used
    assert min(reductions) > 3


def test_downscale_target_is_validated():
    op = ImageRandomCropDecoder()
    with pytest.raises(ValueError, match=r"downscale_target.*\(0, 5\)"):
        op.downscale_target = (0, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(random_area=(0.5, 0.1)), r"random_area.*\(0\.5, 0\.1\)"),
        (dict(random_area=(0.0, 1.0)), r"random_area.*\(0\.0, 1\.0\)"),
        (dict(random_aspect_ratio=(-1, 2)), r"random_aspect_ratio.*\(-1, 2\)"),
        (dict(num_attempts=0), "num_attempts.*0"),
        (dict(output_type="YUV"), "output_type.*'YUV'"),
    ],
)
def test_random_crop_decoder_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageRandomCropDecoder(**kwargs)


# --- random crop window ----------------------------------------------------------------------------


def test_crop_window_deterministic_per_sample():
    op = ImageRandomCropDecoder()
    a = [op.crop_window(ctx(idx=i), 300, 400) for i in range(50)]
    assert a == [op.crop_window(ctx(idx=i), 300, 400) for i in range(50)]
    assert len(set(a)) > 45  # other samples, other boxes
    assert op.crop_window(ctx(idx=0, epoch=1), 300, 400) != a[0]
    assert op.crop_window(ctx(idx=0, op_key=8), 300, 400) != a[0]


def test_crop_window_respects_bounds_area_and_ratio():
    from ray_extsrc.fn._random_crop_window import random_crop_window  # shared with the GPU path

    rng = np.random.default_rng(0)
    area, ratio = (0.2, 0.7), (0.5, 2.0)
    for _ in range(2000):
        H, W = int(rng.integers(20, 600)), int(rng.integers(20, 600))
        y, x, h, w = random_crop_window(rng, H, W, area, ratio, 10)
        assert 0 <= y and 0 <= x and h >= 1 and w >= 1 and y + h <= H and x + w <= W
        if (h, w) == (H, W) or y == (H - h) // 2 and x == (W - w) // 2 and (h == H or w == W):
            continue  # fallback (centre crop) - allowed to break the area range
        # rounding h, w to integers moves area and ratio by up to ~1/min(h, w) relative
        tol = 2.5 / min(h, w)
        assert area[0] * (1 - tol) <= h * w / (H * W) <= area[1] * (1 + tol)
        assert ratio[0] * (1 - tol) <= w / h <= ratio[1] * (1 + tol)


def test_crop_window_fallback_is_centred_and_clamped():
    from ray_extsrc.fn._random_crop_window import random_crop_window

    # 10x1000 cannot hold a box of ratio <= 2 covering >= 90% of its area: fall back
    y, x, h, w = random_crop_window(np.random.default_rng(1), 10, 1000, (0.9, 1.0), (0.5, 2.0), 10)
    assert (y, h, w) == (0, 10, 20) and x == (1000 - 20) // 2
    y, x, h, w = random_crop_window(np.random.default_rng(1), 1000, 10, (0.9, 1.0), (0.5, 2.0), 10)
    assert (x, w, h) == (0, 10, 20) and y == (1000 - 20) // 2


# --- resize ----------------------------------------------------------------------------------------


def test_resize_to_fixed_size_matches_pillow():
    img = picture(300, 400)
    out = run(Resize(size=(120, 90)), img)  # DALI's size is (height, width)
    assert out.shape == (120, 90, 3)
    ref = np.asarray(Image.fromarray(img).resize((90, 120), Image.BILINEAR, reducing_gap=None))
    np.testing.assert_array_equal(out, ref)
    assert Resize(size=(120, 90)).fixed_output_size == (120, 90)
    assert Resize(resize_shorter=100).fixed_output_size is None


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(resize_x=200), (150, 200)),  # one extent given: aspect ratio kept
        (dict(resize_y=75), (75, 100)),
        (dict(resize_x=100, resize_y=50), (50, 100)),  # both: stretched
        (dict(resize_shorter=150), (150, 200)),
        (dict(resize_longer=100), (75, 100)),
        (dict(size=(100, 100), mode="not_larger"), (75, 100)),
        (dict(size=(100, 100), mode="not_smaller"), (100, 133)),
        (dict(size=(0, 100)), (75, 100)),
        (dict(resize_x=100, mode="stretch"), (300, 100)),
        (dict(resize_shorter=150, max_size=180), (135, 180)),
        (dict(size=50), (50, 50)),
    ],
)
def test_resize_output_size_rules(kwargs, shape):
    assert run(Resize(**kwargs), picture(300, 400)).shape == (*shape, 3)


def test_resize_shorter_rounds_like_dali():
    # 375x500 -> shorter 256: width 341.33 rounds to 341
    assert run(Resize(resize_shorter=256), picture(375, 500)).shape == (256, 341, 3)
    assert run(Resize(resize_shorter=7), picture(10, 15)).shape == (7, 11, 3)  # 10.5 -> 11


def test_resize_nearest_upscale_replicates_pixels():
    img = picture(20, 30)
    out = run(Resize(size=(40, 60), interp_type=types.INTERP_NN), img)
    np.testing.assert_array_equal(out, img.repeat(2, 0).repeat(2, 1))


def test_resize_float_output_and_antialias_off():
    img = picture(120, 160)
    out_f = run(Resize(size=(60, 80), dtype=types.FLOAT), img)
    out_u = run(Resize(size=(60, 80)), img)
    # Pillow's uint8 path rounds between its horizontal and vertical passes: up to 1 level apart
    assert out_f.dtype == np.float32 and np.abs(out_f - out_u).max() <= 1.0
    # 2x downscale without antialiasing samples between pixel pairs: the mean of each 2x2 block
    plain = run(Resize(size=(60, 80), antialias=False), img).astype(float)
    blocks = img.reshape(60, 2, 80, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(plain - blocks).max() <= 1


def test_resize_gray_and_per_sample_size():
    gray = picture(40, 60)[:, :, :1]
    node = build(lambda x: fn.resize(x, resize_x=fn.random.uniform(range=(10, 20))))
    assert node.op.fixed_output_size is None
    out = run(node.op, gray, resize_x=np.float32(30))
    assert out.shape == (20, 30, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(resize_x=-3), r"fn.resize: resize_x must be > 0; got -3"),
        (dict(), "exactly one"),
        (dict(resize_x=10, size=(5, 5)), "exactly one"),
        (dict(resize_shorter=10, mode="stretch"), "mode"),
        (dict(size=(0, 0)), r"size.*\(0, 0\)"),
        (dict(resize_x=10, mode="fit"), "mode.*'fit'"),
        (dict(resize_x=10, interp_type="lanczos9"), "interp_type.*'lanczos9'"),
    ],
)
def test_resize_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Resize(**kwargs)


# --- crop / flip -----------------------------------------------------------------------------------


def test_crop_anchor_rounds_half_away_from_zero():
    img = np.arange(10 * 10 * 1, dtype=np.uint8).reshape(10, 10, 1)
    # anchor = round(0.5 * (10 - 5)) = round(2.5) = 3 (std::roundf), not 2 (banker's rounding)
    np.testing.assert_array_equal(run(Crop(crop=(5, 5)), img), img[3:8, 3:8])
    corner = Crop(crop=(5, 4), crop_pos_x=0.0, crop_pos_y=1.0)
    np.testing.assert_array_equal(run(corner, img), img[5:10, 0:4])
    np.testing.assert_array_equal(run(Crop(crop_h=2.9, crop_w=3, crop_pos_x=0.25), img), img[4:6, 2:5])


def test_crop_per_sample_position():
    img = picture(50, 60)
    node = build(lambda x: fn.crop(x, crop=(10, 20), crop_pos_x=fn.random.uniform(range=(0, 1))))
    out = run(node.op, img, crop_pos_x=np.float32(1.0))
    np.testing.assert_array_equal(out, img[20:30, 40:60])


def test_crop_out_of_bounds_policies():
    img = np.full((4, 6, 3), 9, np.uint8)
    with pytest.raises(ValueError, match=r"8x6 .* 4x6 input"):
        run(Crop(crop=(8, 6)), img)
    padded = run(Crop(crop=(8, 6), out_of_bounds_policy="pad", fill_values=(1, 2, 3)), img)
    # anchor = round(0.5 * (4 - 8)) = -2: two padded rows above, two below
    assert padded.shape == (8, 6, 3)
    np.testing.assert_array_equal(padded[2:6], img)
    np.testing.assert_array_equal(padded[:2], np.broadcast_to([1, 2, 3], (2, 6, 3)))
    np.testing.assert_array_equal(padded[6:], np.broadcast_to([1, 2, 3], (2, 6, 3)))
    trimmed = run(Crop(crop=(8, 4), out_of_bounds_policy="trim_to_shape"), img)
    assert trimmed.shape == (4, 4, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crop=(5,)), r"crop.*\(5,\)"),
        (dict(crop_h=5), "together"),
        (dict(crop=(5, 5), crop_pos_x=1.5), r"crop_pos_x must be in \[0, 1\]; got 1.5"),
        (dict(crop=(5, 5), out_of_bounds_policy="wrap"), "'wrap'"),
        (dict(crop=(5, -5)), "crop_w must be > 0; got -5"),
    ],
)
def test_crop_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Crop(**kwargs)


def test_flip_constant_and_per_sample():
    img = picture(20, 30)
    np.testing.assert_array_equal(run(Flip(), img), img[:, ::-1])
    np.testing.assert_array_equal(run(Flip(horizontal=0, vertical=1), img), img[::-1])
    np.testing.assert_array_equal(run(Flip(horizontal=1, vertical=1), img), img[::-1, ::-1])
    assert run(Flip(horizontal=0), img) is img  # nothing to do: no copy
    node = build(lambda x: fn.flip(x, horizontal=fn.random.coin_flip(), vertical=fn.random.coin_flip()))
    assert set(node.arg_inputs) == {"horizontal", "vertical"}
    out = run(node.op, img, horizontal=np.int32(0), vertical=np.int32(1))
    np.testing.assert_array_equal(out, img[::-1])
    out = run(node.op, img, horizontal=np.int32(1), vertical=np.int32(0))
    np.testing.assert_array_equal(out, img[:, ::-1])


# --- crop_mirror_normalize -------------------------------------------------------------------------

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def cmn_reference(img, mean, std, scale=1.0, shift=0.0, mirror=False, layout="CHW"):
    x = img.astype(np.float64)
    if mirror:
        x = x[:, ::-1]
    out = (x - np.asarray(mean)) / np.asarray(std) * scale + shift
    return out.transpose(2, 0, 1) if layout == "CHW" else out


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("mirror", [0, 1])
def test_cmn_float32_matches_reference(layout, mirror):
    img = picture(64, 48)
    out = run(CropMirrorNormalize(mean=MEAN, std=STD, mirror=mirror, output_layout=layout), img)
    assert out.dtype == np.float32
    ref = cmn_reference(img, MEAN, STD, mirror=mirror, layout=layout)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_cmn_float16_crop_scale_shift(layout):
    img = picture(64, 48)
    op = CropMirrorNormalize(crop=(32, 30), crop_pos_x=0.0, crop_pos_y=1.0, mean=MEAN, std=STD,
                             scale=2.0, shift=0.5, dtype=types.FLOAT16, output_layout=layout)
    out = run(op, img)
    assert out.dtype == np.float16
    ref = cmn_reference(img[32:64, 0:30], MEAN, STD, scale=2.0, shift=0.5, layout=layout)
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=1e-3, atol=2e-3)


def test_cmn_per_sample_mirror_and_uint8_output():
    img = picture(16, 24)
    node = build(lambda x: fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(), mean=100.0,
                                                    std=0.5, dtype=types.UINT8, output_layout="HWC"))
    out = run(node.op, img, mirror=np.int32(1))
    ref = np.clip(np.rint((img[:, ::-1].astype(float) - 100) / 0.5), 0, 255)
    np.testing.assert_array_equal(out, ref)  # rounded and clamped


def test_cmn_pad_output_and_float_input():
    img = picture(8, 8).astype(np.float32) / 255
    out = run(CropMirrorNormalize(mean=0.5, std=0.25, pad_output=True), img)
    assert out.shape == (4, 8, 8)
    np.testing.assert_allclose(out[:3], (img.transpose(2, 0, 1) - 0.5) / 0.25, atol=1e-5)
    assert not out[3].any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(std=[1, 0, 1]), r"std must not contain 0; got \[1, 0, 1\]"),
        (dict(output_layout="NCHW"), "'NCHW'"),
        (dict(dtype=types.INT32), "dtype"),
    ],
)
def test_cmn_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CropMirrorNormalize(**kwargs)


def test_cmn_channel_mismatch_is_reported():
    with pytest.raises(ValueError, match="mean has 3 values but the input has 1 channels"):
        run(CropMirrorNormalize(mean=MEAN, std=STD), picture(8, 8)[:, :, :1])


# --- brightness_contrast ---------------------------------------------------------------------------


def bc_reference(x, brightness=1.0, shift=0.0, contrast=1.0, center=128.0, out_max=255.0):
    return shift * out_max + brightness * (center + contrast * (x.astype(np.float64) - center))


@pytest.mark.parametrize(
    "b, s, c", [(1.0, 0.0, 1.0), (1.3, 0.1, 0.7), (0.5, -0.2, 2.5), (2.0, 0.0, 3.0)]
)
def test_brightness_contrast_uint8_formula_with_clamping(b, s, c):
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = run(BrightnessContrast(brightness=b, brightness_shift=s, contrast=c), img)
    ref = np.clip(np.rint(bc_reference(img, b, s, c)), 0, 255)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref).max() <= 1  # float32 vs float64 at .5 boundaries
    if b * c >= 6:
        assert out.min() == 0 and out.max() == 255  # clamped, not wrapped


def test_brightness_contrast_float_and_dtype_change():
    img = picture(10, 10)
    out = run(BrightnessContrast(contrast=0.5, brightness_shift=0.25, dtype=types.FLOAT), img)
    # float output: the shift is in units of 1.0; the centre still comes from the uint8 input
    np.testing.assert_allclose(out, bc_reference(img, 1.0, 0.25, 0.5, 128.0, 1.0), rtol=1e-6)
    f = img.astype(np.float32) / 255
    out = run(BrightnessContrast(contrast=2.0), f)
    np.testing.assert_allclose(out, 0.5 + 2.0 * (f - 0.5), atol=1e-6)
    out = run(BrightnessContrast(contrast=0.0, contrast_center=10), img)
    assert (out == 10).all()


def test_brightness_contrast_per_sample_args():
    img = picture(10, 10)
    node = build(
        lambda x: fn.brightness_contrast(x, contrast=fn.random.uniform(range=(1, 3)), brightness=1.2)
    )
    out = run(node.op, img, contrast=np.float32(2.0))
    ref = np.clip(np.rint(bc_reference(img, 1.2, 0.0, 2.0)), 0, 255)
    assert np.abs(out.astype(int) - ref).max() <= 1


# --- fn.random -------------------------------------------------------------------------------------


def test_uniform_range_shape_values():
    draws = np.array([run(Uniform(range=(1, 3)), c=ctx(idx=i)) for i in range(2000)])
    assert draws.shape == (2000,) and draws.dtype == np.float32  # one 0-d value per sample
    assert draws.min() >= 1 and draws.max() < 3 and abs(draws.mean() - 2) < 0.05
    assert run(Uniform(), c=ctx(idx=3)) == run(Uniform(), c=ctx(idx=3))
    v = run(Uniform(range=(0, 1), shape=(2, 3)))
    assert v.shape == (2, 3) and len(np.unique(v)) == 6
    pick = Uniform(values=[1, 5, 7], dtype=types.INT32)
    picks = np.array([run(pick, c=ctx(idx=i)) for i in range(600)])
    assert set(np.unique(picks)) == {1, 5, 7} and picks.dtype == np.int32
    assert min(np.bincount(picks)[[1, 5, 7]]) > 150


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_coin_flip_probability(p):
    flips = np.array([run(CoinFlip(probability=p), c=ctx(idx=i)) for i in range(4000)])
    assert flips.dtype == np.int32 and set(np.unique(flips)) <= {0, 1}  # DALI's default: INT32
    assert abs(flips.mean() - p) < 0.03


def test_coin_flip_per_sample_probability_and_shape():
    node = build(lambda x: fn.random.coin_flip(probability=fn.random.uniform(range=(0, 1)), shape=5))
    assert run(node.op, probability=np.float32(1.0)).tolist() == [1] * 5
    assert run(node.op, probability=np.float32(0.0)).tolist() == [0] * 5


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Uniform(range=(3, 1)), r"range.*\(3, 1\)"),
        (lambda: Uniform(shape=(-1,)), r"shape.*\(-1,\)"),
        (lambda: CoinFlip(probability=1.5), r"probability must be in \[0, 1\]; got 1.5"),
        (lambda: CoinFlip(dtype=types.FLOAT), "dtype"),
    ],
)
def test_random_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- the public functions --------------------------------------------------------------------------


def test_fn_namespace_is_honest():
    import ray_extsrc.fn as fn_module

    for name in fn_module.__all__:
        assert hasattr(fn_module, name), name
    assert callable(fn.decoders.image) and callable(fn.decoders.image_random_crop)
    assert callable(fn.random.uniform) and callable(fn.random.coin_flip)


def test_unsupported_dali_arguments_are_refused():
    with pytest.raises(TypeError, match="unsupported argument.*'minibatch_size'"):
        build(lambda x: fn.resize(x, resize_x=10, minibatch_size=4))
    with pytest.raises(TypeError, match="unsupported argument.*'device_memory_padding'"):
        build(lambda x: fn.decoders.image(x, device="mixed", device_memory_padding=1 << 20))
    # hw_decoder_load is a DecoderOptions field now (tests/test_decoder_options.py)
    node = build(lambda x: fn.decoders.image(x, device="mixed", hw_decoder_load=0.6))
    assert node.op.decoder_options.hw_decoder_load == 0.6


def test_data_nodes_only_where_dali_takes_them():
    with pytest.raises(TypeError, match="'mean' must be a constant"):
        build(lambda x: fn.crop_mirror_normalize(x, mean=fn.random.uniform()))


def test_devices_and_seed():
    node = build(lambda x: fn.decoders.image_random_crop(x, device="mixed", seed=42))
    assert node.outputs[0].device == "gpu" and node.op.seed == 42 and node.op.is_random
    with pytest.raises(ValueError, match="device.*'mixed'"):
        build(lambda x: fn.flip(x, device="mixed"))
    assert not build(lambda x: fn.flip(x)).op.is_random
    assert build(lambda x: fn.flip(x, device="gpu")).outputs[0].device == "gpu"


def test_seed_pipeline_ops_run_end_to_end(jpeg):
    # the graph of the tutorial: decode -> brightness_contrast(contrast=random.uniform)
    _, data = jpeg
    with graph_scope(Graph()) as g:
        contrast = fn.random.uniform(range=(1, 3.0))
        fn.brightness_contrast(fn.decoders.image(contrast), contrast=contrast)
    uniform_op, decode_op, bc_op = (n.op for n in g.nodes)
    c = ctx(idx=4)
    value = run(uniform_op, c=c)
    out = run(bc_op, run(decode_op, data, c=c), c=c, contrast=value)
    assert out.shape == (300, 400, 3) and out.dtype == np.uint8


def test_cmyk_jpeg_decodes_like_pillow(tmp_path):
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 200, 30, 5)).save(buf, "JPEG", quality=95)
    data = np.frombuffer(buf.getvalue(), np.uint8)
    assert np.abs(run(ImageDecoder(), data).astype(int) - pillow_decode(data)).max() <= 2


def test_bool_flags_are_accepted():
    img = picture(6, 8)
    np.testing.assert_array_equal(run(Flip(horizontal=False, vertical=True), img), img[::-1])
    out = run(CropMirrorNormalize(mirror=True, output_layout="HWC"), img)
    np.testing.assert_array_equal(out, img[:, ::-1].astype(np.float32))


def test_ops_survive_pickling():
    # ops travel to spawned workers and Ray actors by pickle; per-sample markers must survive
    import pickle

    img = picture(30, 40)
    node = build(lambda x: fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(), mean=MEAN,
                                                    std=STD, dtype=types.FLOAT16))
    for op in (node.op, Resize(resize_shorter=20), ImageRandomCropDecoder(seed=3)):
        clone = pickle.loads(pickle.dumps(op))
        assert type(clone) is type(op)
    clone = pickle.loads(pickle.dumps(node.op))
    np.testing.assert_array_equal(run(clone, img, mirror=1), run(node.op, img, mirror=1))
    with pytest.raises(ValueError, match="'mirror' was given as a DataNode"):
        run(clone, img)


@pytest.mark.parametrize("h, w", [(1, 1), (7, 9), (17, 3)])
def test_tiny_jpegs_through_random_crop_and_downscale(tmp_path, h, w):
    data = encode(picture(max(h, 2), max(w, 2))[:h, :w], "JPEG", tmp_path, quality=95)
    for target in (None, (1, 1)):
        op = ImageRandomCropDecoder()
        op.downscale_target = target
        for idx in range(5):
            out = run(op, data, c=ctx(idx=idx))
            assert 1 <= out.shape[0] <= h and 1 <= out.shape[1] <= w


def test_sample_contexts_are_made_on_demand_and_equal_the_eager_ones():
    from ray_extsrc.graph import SampleContexts
    from ray_extsrc.types import SampleInfo

    g = Graph()
    with graph_scope(g):
        fn.random.coin_flip(probability=0.5, seed=99)
        fn.random.coin_flip(probability=0.5)
    infos = [SampleInfo(10 + j, j, 3, 2) for j in range(5)]
    for node in g.nodes:
        lazy = SampleContexts(node, 1234, infos)
        eager = [SampleContext.of(node, 1234, info.epoch_idx, info) for info in infos]
        assert not lazy._made and len(lazy) == 5
        assert lazy[3] == eager[3] and list(lazy._made) == [3]  # only what was asked for
        assert lazy[-1] == eager[-1] and lazy[1:4] == eager[1:4] and list(lazy) == eager
        assert lazy[3] is lazy[3]
        with pytest.raises(IndexError):
            lazy[5]
