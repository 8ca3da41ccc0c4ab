"""The ops of DALI's classification examples added for issue 12: decoders.image_crop/image_slice,
random_resized_crop, color_twist, hsv, rotate, cast, transpose, normalize, random.normal.

Each op runs inside a real pipeline (``pipeline_def`` + ``external_source``) and is compared with a
reference written here from DALI's documented formulas (NumPy, Pillow, colorsys); one pipeline runs
them all with ``parallel=True`` and must match the serial run exactly.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ray_extsrc import NoGPUWarning, fn, pipeline_def, types
from ray_extsrc.fn.decoders import ImageRandomCropDecoder
from ray_extsrc.fn.geometry import RandomResizedCrop
from ray_extsrc.graph import Graph, SampleContext, graph_scope
from ray_extsrc.sample_rng import sample_rng
from ray_extsrc.types import SampleInfo

# Every test here builds pipelines with one in-process source (parallel=False) except one, which
# forks 2 workers; 60 s leaves room for a loaded 2-core CI machine (the file runs in ~3 s).
pytestmark = pytest.mark.timeout(60)

SEED = 1234


# --- helpers ---------------------------------------------------------------------------------------


class ListSource:
    """Sample i is ``samples[i]`` (a tuple of arrays); full batches only. Module-level: it pickles."""

    def __init__(self, samples, batch_size):
        self.samples, self.batch_size = samples, batch_size

    def __len__(self):
        return len(self.samples)

    def __call__(self, info: SampleInfo):
        if info.iteration >= len(self.samples) // self.batch_size:
            raise StopIteration
        return self.samples[info.idx_in_epoch]


def run_pipeline(graph, samples, *, batch_size=2, parallel=False, workers=1, epochs=1, layout=None,
                 device_id=None):
    """Build ``graph(*source_outputs)`` behind a source of ``samples``; return the pipeline (for its
    graph) and per-sample tuples of output arrays, in sample order, epoch after epoch."""

    @pipeline_def(batch_size=batch_size, num_threads=1, seed=SEED, py_num_workers=workers, device_id=device_id)
    def pipe():
        outs = fn.external_source(source=ListSource(samples, batch_size), num_outputs=len(samples[0]),
                                  batch=False, parallel=parallel, layout=layout)
        result = graph(*outs)
        return result if isinstance(result, tuple) else (result,)

    p = pipe()
    got, layouts = [], None
    try:
        for _ in range(epochs):
            while True:
                try:
                    batch = p.run()
                except StopIteration:
                    p.reset()
                    break
                layouts = [t.layout() for t in batch]
                batch = [t.as_cpu() for t in batch]
                got.extend(tuple(np.array(t.at(i)) for t in batch) for i in range(len(batch[0])))
    finally:
        p.close()
    p.output_layouts = layouts
    return p, got


def node_ctx(p, op_name, idx, epoch=0):
    """The SampleContext the pipeline gave op ``op_name`` for sample ``idx`` (its random stream)."""
    node = next(n for n in p.graph.nodes if n.op.name == op_name)
    return SampleContext.of(node, p.seed, epoch, SampleInfo(idx, idx % 2, idx // 2, epoch))


def picture(h=48, w=64, seed=0):
    """Gradients, shapes and a little noise: crops, rotations and colour changes show."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                    (xx + 2 * yy) * 255 // (w + 2 * h)], -1).astype(np.uint8)
    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    draw.rectangle([w // 8, h // 6, w // 3, h // 2], fill=(250, 20, 30))
    draw.ellipse([w // 2, h // 2, w - w // 8, h - h // 10], fill=(20, 30, 240))
    noise = np.random.default_rng(seed).integers(-6, 7, (h, w, 3))
    return np.clip(np.asarray(im).astype(int) + noise, 0, 255).astype(np.uint8)


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def jpeg(img, quality=95):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.frombuffer(buf.getvalue(), np.uint8)


def build(call):
    """The op node ``call(x)`` adds to a fresh graph (for argument checks)."""
    with graph_scope(Graph()) as g:
        call(fn.random.uniform())
        return g.nodes[-1]


def round_half_away(v):
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


IMAGES = [picture(48, 64, 0), picture(40, 30, 1), picture(33, 51, 2), picture(64, 48, 3)]


# --- decoders.image_crop ---------------------------------------------------------------------------


def test_image_crop_is_decode_then_dali_window():
    samples = [(png(im), np.float32(pos)) for im, pos in zip(IMAGES, (0.0, 0.3, 0.75, 1.0))]
    _, got = run_pipeline(
        lambda data, pos: fn.decoders.image_crop(data, crop=(20, 24), crop_pos_x=pos, crop_pos_y=0.25),
        samples,
    )
    for (img, pos), (out,) in zip(((im, s[1]) for im, s in zip(IMAGES, samples)), got):
        H, W = img.shape[:2]
        y = round_half_away(0.25 * (H - 20))  # DALI: round(crop_pos * (extent - crop)), halves away
        x = round_half_away(float(pos) * (W - 24))
        np.testing.assert_array_equal(out, img[y : y + 20, x : x + 24])


def test_image_crop_per_sample_size_jpeg_and_gray():
    img = IMAGES[0]
    data = jpeg(img)
    samples = [(data, np.float32(10), np.float32(31.7))] * 2
    _, got = run_pipeline(
        lambda d, h, w: (fn.decoders.image_crop(d, crop_h=h, crop_w=w, crop_pos_x=1.0, crop_pos_y=0.0),
                         fn.decoders.image_crop(d, crop=(10, 31), output_type=types.GRAY)),
        samples,
    )
    with Image.open(io.BytesIO(data.tobytes())) as im:
        full = np.asarray(im.convert("RGB")).astype(int)
    out, gray = got[0]
    assert out.shape == (10, 31, 3)  # fractional sizes are truncated, as DALI's static_cast<int>
    assert np.abs(out.astype(int) - full[0:10, 64 - 31 : 64]).max() <= 3  # libjpeg-turbo vs Pillow
    assert gray.shape == (10, 31, 1)


def test_image_crop_refuses_windows_outside_and_unknown_arguments():
    with pytest.raises(ValueError, match=r"crop window 50x10 does not fit the 48x64 image"):
        run_pipeline(lambda d: fn.decoders.image_crop(d, crop=(50, 10)), [(png(IMAGES[0]),)] * 2)
    with pytest.raises(TypeError, match=r"unsupported argument.*'crop_d'"):
        build(lambda x: fn.decoders.image_crop(x, crop=(5, 5), crop_d=3))
    with pytest.raises(TypeError, match=r"unsupported argument.*'out_of_bounds_policy'"):
        build(lambda x: fn.decoders.image_crop(x, crop=(5, 5), out_of_bounds_policy="pad"))
    with pytest.raises(ValueError, match="crop_pos_x must be in"):
        build(lambda x: fn.decoders.image_crop(x, crop=(5, 5), crop_pos_x=1.5))


# --- decoders.image_slice --------------------------------------------------------------------------


def dali_named_slice(h, w, axes, start=None, rel_start=None, end=None, rel_end=None, shape=None,
                     rel_shape=None):
    """SliceAttr's rule, from DALI's docs: per listed axis, start/end in pixels, rounded half away."""
    lo, hi = [0, 0], [h, w]
    extent = (h, w)
    for i, d in enumerate(axes):
        n = extent[d]
        a = start[i] if start is not None else rel_start[i] * n if rel_start is not None else 0.0
        if end is not None:
            e = end[i]
        elif rel_end is not None:
            e = rel_end[i] * n
        elif shape is not None:
            e = a + shape[i]
        elif rel_shape is not None:
            e = (rel_start[i] + rel_shape[i]) * n if rel_start is not None else a + rel_shape[i] * n
        else:
            e = n
        lo[d], hi[d] = round_half_away(a), round_half_away(e)
    return slice(lo[0], hi[0]), slice(lo[1], hi[1])


@pytest.mark.parametrize(
    "kwargs, axes",
    [
        (dict(rel_start=(0.1, 0.25), rel_shape=(0.5, 0.5)), (1, 0)),  # default axis_names "WH"
        (dict(start=(3, 5), shape=(20, 11)), (1, 0)),
        (dict(start=(3, 5), end=(30, 21)), (1, 0)),
        (dict(rel_start=(0.5, 0.1), rel_end=(1.0, 0.9), axis_names="HW"), (0, 1)),
        (dict(rel_start=(0.2,), rel_shape=(0.3,), axis_names="H"), (0,)),
        (dict(start=(4,), shape=(9,), axes=(-1,)), (1,)),
        (dict(rel_shape=(0.5, 0.5)), (1, 0)),
    ],
)
def test_image_slice_named_arguments_match_dali_rule(kwargs, axes):
    samples = [(png(im),) for im in IMAGES[:2]]
    _, got = run_pipeline(lambda d: fn.decoders.image_slice(d, **kwargs), samples)
    names = ("start", "rel_start", "end", "rel_end", "shape", "rel_shape")
    ref_args = {k: v for k, v in kwargs.items() if k in names}
    for img, (out,) in zip(IMAGES, got):
        sy, sx = dali_named_slice(*img.shape[:2], axes, **ref_args)
        np.testing.assert_array_equal(out, img[sy, sx])


def test_image_slice_per_sample_named_and_positional_inputs():
    img = IMAGES[0]  # 48 x 64
    samples = [
        (png(img), np.float32([0.25, 0.5]), np.float32([0.5, 0.25]), np.int32([10, 4]), np.int32([20, 30])),
        (png(img), np.float32([0.0, 0.0]), np.float32([1.0, 1.0]), np.int32([0, 0]), np.int32([64, 48])),
    ]

    def graph(d, rel_a, rel_s, abs_a, abs_s):
        return (fn.decoders.image_slice(d, rel_start=rel_a, rel_shape=rel_s),
                fn.decoders.image_slice(d, rel_a, rel_s),                       # normalized floats
                fn.decoders.image_slice(d, abs_a, abs_s),                       # ints: pixels
                fn.decoders.image_slice(d, fn.cast(abs_a, dtype=types.FLOAT),
                                        fn.cast(abs_s, dtype=types.FLOAT),
                                        normalized_anchor=False, normalized_shape=False))

    _, got = run_pipeline(graph, samples)
    for (_, rel_a, rel_s, abs_a, abs_s), outs in zip(samples, got):
        sy, sx = dali_named_slice(48, 64, (1, 0), rel_start=rel_a.astype(float), rel_shape=rel_s.astype(float))
        np.testing.assert_array_equal(outs[0], img[sy, sx])
        np.testing.assert_array_equal(outs[1], img[sy, sx])
        x, y, w, h = int(abs_a[0]), int(abs_a[1]), int(abs_s[0]), int(abs_s[1])
        np.testing.assert_array_equal(outs[2], img[y : y + h, x : x + w])
        np.testing.assert_array_equal(outs[3], img[y : y + h, x : x + w])


def test_image_slice_validation():
    with pytest.raises(ValueError, match="mutually exclusive"):
        build(lambda x: fn.decoders.image_slice(x, start=(1, 1), rel_start=(0.1, 0.1)))
    with pytest.raises(ValueError, match="mutually exclusive; got end, rel_shape"):
        build(lambda x: fn.decoders.image_slice(x, end=(5, 5), rel_shape=(0.1, 0.1)))
    with pytest.raises(ValueError, match="named slice arguments or|give the slice"):
        build(lambda x: fn.decoders.image_slice(x))
    with pytest.raises(ValueError, match=r"rel_start must have 2 values"):
        build(lambda x: fn.decoders.image_slice(x, rel_start=(0.1,)))
    with pytest.raises(ValueError, match="axis_names must use the letters"):
        build(lambda x: fn.decoders.image_slice(x, rel_start=(0.1, 0.1, 0), axis_names="WHC"))
    with pytest.warns(UserWarning, match="only apply to the positional"):
        build(lambda x: fn.decoders.image_slice(x, rel_start=(0.1, 0.1), normalized_anchor=False))
    with pytest.raises(TypeError, match=r"unsupported argument.*'out_of_bounds_policy'"):
        build(lambda x: fn.decoders.image_slice(x, rel_start=(0.1, 0.1), out_of_bounds_policy="pad"))
    with pytest.raises(ValueError, match=r"slice rows 0:48, columns 60:70 leave the 48x64 image"):
        run_pipeline(lambda d: fn.decoders.image_slice(d, start=(60, 0), shape=(10, 48)), [(png(IMAGES[0]),)] * 2)


# --- random_resized_crop ---------------------------------------------------------------------------


def test_random_resized_crop_box_and_resize_match_pillow():
    samples = [(im,) for im in IMAGES]
    p, got = run_pipeline(lambda x: fn.random_resized_crop(x, size=(24, 20), random_area=(0.3, 0.9)),
                          samples, epochs=2)
    assert len(got) == 8
    op = next(n for n in p.graph.nodes if n.op.name == "random_resized_crop").op
    for k, (out,) in enumerate(got):
        epoch, idx = divmod(k, 4)
        img = IMAGES[idx]
        y, x, h, w = op.crop_window(node_ctx(p, "random_resized_crop", idx, epoch), *img.shape[:2])
        # the box obeys DALI's RandomCropAttr ranges (area fraction, aspect ratio w/h) ...
        area = h * w / (img.shape[0] * img.shape[1])
        assert 0.3 - 0.05 <= area <= 0.9 + 0.05 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1, (area, w / h)
        # ... and the output is that box resized (Pillow's antialiased bilinear, DALI's default)
        ref = np.asarray(Image.fromarray(img).resize((20, 24), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h)))
        assert out.shape == (24, 20, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, ref)
    assert not np.array_equal(got[0][0], got[4][0])  # a new box in the next epoch


def test_random_resized_crop_draws_the_decoders_boxes():
    """Same parameters, same random stream -> the same box as fn.decoders.image_random_crop."""
    kw = dict(random_area=(0.1, 0.7), random_aspect_ratio=(0.5, 2.0), num_attempts=4)
    dec, rrc = ImageRandomCropDecoder(**kw), RandomResizedCrop(size=8, **kw)
    for idx in range(50):
        c = SampleContext(seed=5, op_key=3, epoch_idx=1, idx_in_epoch=idx, idx_in_batch=0, iteration=0)
        assert dec.crop_window(c, 37, 91) == rrc.crop_window(c, 37, 91)


def test_random_resized_crop_float_output_nn_and_validation():
    img = IMAGES[1]
    op = RandomResizedCrop(size=16, interp_type=types.INTERP_NN, dtype=types.FLOAT)
    c = SampleContext(seed=1, op_key=2, epoch_idx=0, idx_in_epoch=3, idx_in_batch=0, iteration=0)
    out = op.run_cpu([img], {}, c)
    y, x, h, w = op.crop_window(c, *img.shape[:2])
    ref = np.asarray(Image.fromarray(img).resize((16, 16), Image.Resampling.NEAREST, box=(x, y, x + w, y + h)))
    assert out.dtype == np.float32 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, ref.astype(np.float32))
    with pytest.raises(TypeError, match="size is required"):
        RandomResizedCrop()
    with pytest.raises(ValueError, match=r"size must be .*got \(0, 5\)"):
        RandomResizedCrop(size=(0, 5))
    with pytest.raises(ValueError, match=r"random_area must lie in \(0, 1\]; got \(0.5, 1.5\)"):
        RandomResizedCrop(size=4, random_area=(0.5, 1.5))
    with pytest.raises(TypeError, match=r"unsupported argument.*'mag_filter'"):
        build(lambda x: fn.random_resized_crop(x, size=4, mag_filter=types.INTERP_NN))


# --- color_twist / hsv -----------------------------------------------------------------------------

# DALI's YIQ matrix (color_twist.h), written out again for the reference
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])


def yiq_reference(img, hue=0.0, saturation=1.0, value=1.0, brightness=1.0, contrast=1.0, half=128.0):
    """DALI's documented colour model: hue rotates the chroma (I + iQ) by -hue degrees (I' = I cos
    + Q sin), saturation scales the chroma, value scales everything, then contrast about the half
    range and brightness as a factor."""
    yiq = img.astype(np.float64) @ RGB2YIQ.T
    chroma = (yiq[..., 1] + 1j * yiq[..., 2]) * np.exp(-1j * math.radians(hue)) * saturation * value
    yiq = np.stack([yiq[..., 0] * value, chroma.real, chroma.imag], -1)
    rgb = np.linalg.solve(RGB2YIQ, yiq.reshape(-1, 3).T).T.reshape(img.shape)
    return brightness * (contrast * rgb + half * (1 - contrast))


def to_uint8(x):
    return np.clip(np.rint(x), 0, 255)


def test_color_twist_per_sample_matches_yiq_reference():
    samples = [(im,) for im in IMAGES]

    def graph(x):
        hue = fn.random.uniform(range=(-60, 60))
        sat = fn.random.uniform(range=(0.3, 1.6))
        con = fn.random.uniform(range=(0.5, 1.5))
        return fn.color_twist(x, hue=hue, saturation=sat, contrast=con, brightness=1.2), hue, sat, con

    _, got = run_pipeline(graph, samples)
    for img, (out, hue, sat, con) in zip(IMAGES, got):
        ref = to_uint8(yiq_reference(img, float(hue), float(sat), brightness=1.2, contrast=float(con)))
        assert out.dtype == np.uint8
        assert np.abs(out.astype(int) - ref).max() <= 1  # float32 vs float64 at .5 boundaries


def test_color_twist_properties_and_float_input():
    img = IMAGES[0]
    luma = img.astype(float) @ [0.299, 0.587, 0.114]

    def graph(x, f):
        return (fn.color_twist(x, saturation=0.0), fn.color_twist(x, hue=360.0),
                fn.color_twist(x, contrast=0.0), fn.color_twist(f, contrast=2.0, hue=30.0),
                fn.color_twist(x, brightness=0.5, dtype=types.FLOAT))

    _, got = run_pipeline(graph, [(img, img.astype(np.float32) / 255)] * 2)
    gray, same, flat, fl, half_f = got[0]
    assert np.abs(gray.astype(float) - to_uint8(luma)[..., None]).max() <= 1  # R = G = B = Y
    assert np.abs(same.astype(int) - img).max() <= 1
    assert (flat == 128).all()  # contrast 0: everything at the centre of the uint8 range
    ref = yiq_reference(img.astype(np.float32) / 255, hue=30.0, contrast=2.0, half=0.5)
    assert fl.dtype == np.float32 and np.abs(fl - ref).max() < 1e-4  # floats: half range is 0.5
    np.testing.assert_allclose(half_f, img * 0.5, atol=1e-3)


def test_hsv_matches_reference_and_keeps_luma():
    samples = [(im,) for im in IMAGES[:2]]

    def graph(x):
        hue = fn.random.uniform(range=(-180, 180))
        return fn.hsv(x, hue=hue, saturation=1.3, value=0.8), hue, fn.hsv(x, hue=hue, dtype=types.FLOAT)

    _, got = run_pipeline(graph, samples)
    for img, (out, hue, out_f) in zip(IMAGES, got):
        ref = yiq_reference(img, float(hue), 1.3, 0.8)
        assert np.abs(out.astype(int) - to_uint8(ref)).max() <= 1
        luma_in = img.astype(float) @ [0.299, 0.587, 0.114]
        luma_out = out_f.astype(float) @ [0.299, 0.587, 0.114]
        assert np.abs(luma_out - luma_in).max() < 1e-2  # a hue rotation keeps Y


def test_color_ops_validation():
    with pytest.raises(ValueError, match="image_type must be types.RGB"):
        build(lambda x: fn.color_twist(x, image_type=types.BGR))
    with pytest.raises(TypeError, match=r"unsupported argument.*'value'"):
        build(lambda x: fn.color_twist(x, value=2.0))  # DALI's color_twist has no value
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        build(lambda x: fn.hsv(x, dtype=types.FLOAT64))
    with pytest.raises(ValueError, match=r"3 \(RGB\) channels; got shape \(4, 4, 1\)"):
        build(lambda x: fn.hsv(x)).op.run_cpu([np.zeros((4, 4, 1), np.uint8)], {}, None)


# --- rotate ----------------------------------------------------------------------------------------


def canvas(h, w, deg):
    """DALI's RotatedCanvasSize, as documented in rotate_params.h."""
    c, s = abs(math.cos(math.radians(deg))), abs(math.sin(math.radians(deg)))
    wo, ho = math.ceil(c * w + s * h - 0.01), math.ceil(c * h + s * w - 0.01)
    if s <= c:
        wo += (wo % 2) != (w % 2)
        ho += (ho % 2) != (h % 2)
    else:
        ho += (ho % 2) != (w % 2)
        wo += (wo % 2) != (h % 2)
    return ho, wo


@pytest.mark.parametrize("interp", [types.INTERP_NN, types.INTERP_LINEAR])
def test_rotate_right_angles_are_exact_and_counter_clockwise(interp):
    img = IMAGES[2]  # 33 x 51: odd sizes
    samples = [(img, np.float32(a)) for a in (90, 180, 270, -90)]
    _, got = run_pipeline(lambda x, a: fn.rotate(x, angle=a, interp_type=interp), samples)
    refs = [np.rot90(img, 1), np.rot90(img, 2), np.rot90(img, 3), np.rot90(img, -1)]  # rot90: CCW
    for ref, (out,) in zip(refs, got):
        np.testing.assert_array_equal(out, ref)


def test_rotate_arbitrary_angle_matches_pillow_and_dali_canvas():
    img = picture(60, 80, 4)
    _, got = run_pipeline(lambda x: (fn.rotate(x, angle=30.0), fn.rotate(x, angle=-20.0, fill_value=0)),
                          [(img,)] * 2)
    out, out_fill = got[0]
    assert out.shape[:2] == canvas(60, 80, 30) and out_fill.shape[:2] == canvas(60, 80, -20)
    for o, deg in ((out, 30), (out_fill, -20)):
        # Pillow's rotate: counter-clockwise about the centre, bilinear; compare the middle
        ref = np.asarray(Image.fromarray(img).rotate(deg, Image.Resampling.BILINEAR, expand=True)).astype(float)
        cy, cx, ry, rx = o.shape[0] // 2, o.shape[1] // 2, ref.shape[0] // 2, ref.shape[1] // 2
        a = o[cy - 15 : cy + 15, cx - 20 : cx + 20].astype(float)
        b = ref[ry - 15 : ry + 15, rx - 20 : rx + 20]
        assert np.abs(a - b).mean() < 4, deg
    assert (out_fill[0, 0] == 0).all()  # fill_value outside the source
    assert (out[0, 0] > 0).any()  # no fill_value: the border pixel is repeated (DALI clamps)


def test_rotate_keep_size_size_fill_and_dtype():
    img = IMAGES[0]  # 48 x 64
    sizes = [(img, np.float32([40, 50]))] * 2
    _, got = run_pipeline(
        lambda x, s: (fn.rotate(x, angle=45, keep_size=True, fill_value=7, interp_type=types.INTERP_NN),
                      fn.rotate(x, angle=10, size=s), fn.rotate(x, angle=10, size=(30.4, 20.6)),
                      fn.rotate(x, angle=0, dtype=types.FLOAT)),
        sizes,
    )
    keep, per_sample, const, same = got[0]
    assert keep.shape == img.shape and (keep[0, 0] == 7).all() and (keep[-1, -1] == 7).all()
    # pixel (24, 32)'s centre (32.5, 24.5) reads the source at (32, 24.71): pixel (24, 32) itself
    np.testing.assert_array_equal(keep[24, 32], img[24, 32])
    assert per_sample.shape == (40, 50, 3) and const.shape == (30, 21, 3)  # rounded to nearest
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, img.astype(np.float32))  # angle 0: the identity


def test_rotate_validation():
    with pytest.raises(TypeError, match="angle is required"):
        build(lambda x: fn.rotate(x))
    with pytest.raises(TypeError, match=r"unsupported argument.*'axis'"):
        build(lambda x: fn.rotate(x, angle=10, axis=(0, 0, 1)))
    with pytest.raises(ValueError, match="interp_type must be types.INTERP_NN or types.INTERP_LINEAR"):
        build(lambda x: fn.rotate(x, angle=10, interp_type=types.INTERP_CUBIC))
    with pytest.raises(ValueError, match=r"size must be \(height, width\) > 0; got \[4, 0\]"):
        build(lambda x: fn.rotate(x, angle=10, size=(4, 0)))
    # as in DALI, an explicit size wins over keep_size; tiny sizes round up to 1
    op = build(lambda x: fn.rotate(x, angle=10, size=(4, 0.2), keep_size=True)).op
    assert op.run_cpu([IMAGES[0]], {}, None).shape == (4, 1, 3)


# --- cast / transpose ------------------------------------------------------------------------------


def test_cast_rounds_and_saturates_like_convert_sat():
    f = np.array([-300.7, -1.5, -0.5, 0.49, 0.5, 1.5, 2.5, 127.5, 254.5, 255.4, 1e9], np.float32)
    i = np.array([-70000, -129, -1, 0, 200, 300, 70000], np.int32)
    samples = [(f, i)] * 2

    def graph(f, i):
        return (fn.cast(f, dtype=types.UINT8), fn.cast(f, dtype=types.INT8), fn.cast(i, dtype=types.INT16),
                fn.cast(i, dtype=types.UINT8), fn.cast(i, dtype=types.FLOAT16), fn.cast(f, dtype=types.BOOL),
                fn.cast(f, dtype=types.INT32))

    _, got = run_pipeline(graph, samples)
    u8, i8, i16, iu8, h, b, i32 = got[0]
    rint = np.rint(f.astype(np.float64))  # round to nearest (even on .5), then clamp
    np.testing.assert_array_equal(u8, np.clip(rint, 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(i8, np.clip(rint, -128, 127).astype(np.int8))
    np.testing.assert_array_equal(i16, np.clip(i, -32768, 32767).astype(np.int16))
    np.testing.assert_array_equal(iu8, np.clip(i, 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(h, np.clip(i, -65504, 65504).astype(np.float16))  # saturated, not inf
    np.testing.assert_array_equal(b, f != 0)
    np.testing.assert_array_equal(i32, rint.astype(np.int32))
    assert (u8.dtype, i8.dtype, h.dtype, b.dtype) == (np.uint8, np.int8, np.float16, np.bool_)
    with pytest.raises(TypeError, match="dtype is required"):
        build(lambda x: fn.cast(x))


def test_transpose_data_and_layouts():
    img = IMAGES[1]
    p, got = run_pipeline(
        lambda x: (fn.transpose(x, perm=[2, 0, 1]), fn.transpose(x, perm=(1, 0, 2), transpose_layout=False),
                   fn.transpose(x, perm=[2, 1, 0], output_layout="CWH"), fn.transpose(fn.cast(x, dtype=types.FLOAT), perm=[0, 1, 2])),
        [(img,)] * 2, layout="HWC",
    )
    chw, swapped, cwh, ident = got[0]
    np.testing.assert_array_equal(chw, np.transpose(img, (2, 0, 1)))
    np.testing.assert_array_equal(swapped, np.transpose(img, (1, 0, 2)))
    np.testing.assert_array_equal(cwh, np.transpose(img, (2, 1, 0)))
    np.testing.assert_array_equal(ident, img.astype(np.float32))
    assert p.output_layouts == ["CHW", "HWC", "CWH", "HWC"]
    with pytest.raises(ValueError, match=r"perm must be a permutation of 0..ndim-1; got \[0, 0, 1\]"):
        build(lambda x: fn.transpose(x, perm=[0, 0, 1]))
    with pytest.raises(ValueError, match=r"has 3 axes but the sample has 2"):
        build(lambda x: fn.transpose(x, perm=[2, 0, 1])).op.run_cpu([np.zeros((2, 2))], {}, None)


# --- normalize -------------------------------------------------------------------------------------


def test_normalize_computed_statistics_match_numpy():
    x = IMAGES[2].astype(np.float32)
    samples = [(IMAGES[2], x)] * 2

    def graph(u8, f):
        return (fn.normalize(f), fn.normalize(u8, axes=(0, 1)), fn.normalize(f, axis_names="HW", ddof=1),
                fn.normalize(f, epsilon=100.0, scale=2.0, shift=3.0))

    _, got = run_pipeline(graph, samples, layout="HWC")
    full, per_channel, named, eps = got[0]
    xf = x.astype(np.float64)
    np.testing.assert_allclose(full, (xf - xf.mean()) / xf.std(), rtol=1e-5, atol=1e-5)
    m, s = xf.mean(axis=(0, 1)), xf.std(axis=(0, 1))
    np.testing.assert_allclose(per_channel, (xf - m) / s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(named, (xf - m) / xf.std(axis=(0, 1), ddof=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eps, 2 * (xf - xf.mean()) / np.sqrt(xf.var() + 100.0) + 3, rtol=1e-5, atol=1e-5)
    assert full.dtype == np.float32


def test_normalize_given_mean_stddev_per_sample_and_integer_output():
    img = IMAGES[0]
    mean = img.astype(np.float32).mean(axis=(0, 1), keepdims=True)  # (1, 1, 3) per sample
    samples = [(img, mean, np.float32(40.0))] * 2

    def graph(x, m, s):
        return (fn.normalize(x, mean=m, stddev=s),                   # tensor mean: axes from its shape
                fn.normalize(x, mean=m),                             # computed stddev about that mean
                fn.normalize(x, mean=100.0, stddev=50.0, scale=64.0, shift=128.0, dtype=types.UINT8),
                fn.normalize(x, mean=5.0, stddev=-2.0))

    _, got = run_pipeline(graph, samples)
    given, computed, u8, neg = got[0]
    xf = img.astype(np.float64)
    np.testing.assert_allclose(given, (xf - mean) / 40.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(computed, (xf - mean) / np.sqrt(((xf - mean) ** 2).mean(axis=(0, 1))), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(u8, np.clip(np.rint(64 * (xf - 100) / 50 + 128), 0, 255))
    np.testing.assert_allclose(neg, (xf - 5) / -2.0, rtol=1e-6)


def test_normalize_zero_variance_and_ddof_give_shift():
    flat = np.full((4, 5), 3.0, np.float32)
    _, got = run_pipeline(lambda x: (fn.normalize(x, shift=1.5), fn.normalize(x, axes=0, ddof=3)),
                          [(flat,), (np.arange(20, dtype=np.float32).reshape(4, 5),)])
    np.testing.assert_array_equal(got[0][0], np.full((4, 5), 1.5, np.float32))  # DALI keeps 0 -> shift
    x = np.arange(20, dtype=np.float64).reshape(4, 5)
    np.testing.assert_allclose(got[1][1], (x - x.mean(0)) / x.std(0, ddof=3), rtol=1e-5)
    _, got = run_pipeline(lambda x: fn.normalize(x, axes=1, ddof=5, shift=2.0), [(x.astype(np.float32),)] * 2)
    np.testing.assert_array_equal(got[0][0], np.full((4, 5), 2.0, np.float32))  # N <= ddof: shift


def test_normalize_validation():
    with pytest.raises(ValueError, match="batch=True .* not supported"):
        build(lambda x: fn.normalize(x, batch=True))
    with pytest.raises(ValueError, match="axes and axis_names are mutually exclusive"):
        build(lambda x: fn.normalize(x, axes=(0,), axis_names="H"))
    with pytest.raises(ValueError, match="must not be given when mean and stddev are both scalars"):
        build(lambda x: fn.normalize(x, mean=1.0, stddev=2.0, axes=(0,)))
    with pytest.raises(ValueError, match="a constant mean must be a scalar"):
        build(lambda x: fn.normalize(x, mean=[1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"axis_names='HW' needs an input layout .* is ''"):
        build(lambda x: fn.normalize(x, axis_names="HW"))
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        build(lambda x: fn.normalize(x, dtype=types.FLOAT16))
    with pytest.raises(ValueError, match="per-sample mean has shape"):
        node = build(lambda x: fn.normalize(x, mean=fn.random.uniform(shape=(1, 2)), axes=(0,)))
        node.op.run_cpu([np.zeros((3, 4), np.float32)], {"mean": np.zeros((1, 2))}, None)


# --- random.normal ---------------------------------------------------------------------------------


def test_normal_is_the_counter_based_stream():
    samples = [(np.zeros((2, 3), np.float32),)] * 4

    def graph(x):
        return (fn.random.normal(), fn.random.normal(mean=10.0, stddev=0.5, shape=(3,)), fn.random.normal(x),
                fn.random.normal(mean=fn.random.uniform(range=(100, 200)), stddev=2.0, dtype=types.INT32))

    p, got = run_pipeline(graph, samples, epochs=2)
    names = [n for n in p.graph.nodes if n.op.name == "random.normal"]
    for k, (a, b, like, i32) in enumerate(got):
        epoch, idx = divmod(k, 4)
        info = SampleInfo(idx, idx % 2, idx // 2, epoch)
        streams = [SampleContext.of(n, SEED, epoch, info) for n in names]
        # the documented generator: Philox keyed by (seed, op) at counter (epoch, idx)
        ref = [sample_rng(c.seed, c.op_key, epoch, idx) for c in streams]
        assert a.shape == () and a.dtype == np.float32
        assert a == np.float32(ref[0].standard_normal())
        np.testing.assert_array_equal(b, (ref[1].standard_normal(3) * 0.5 + 10.0).astype(np.float32))
        assert like.shape == (2, 3)
        np.testing.assert_array_equal(like, ref[2].standard_normal((2, 3)).astype(np.float32))
        assert i32.dtype == np.int32 and 90 < i32 < 210
    assert got[0][0] != got[4][0] and got[0][0] != got[1][0]  # new epoch, new sample: new draw


def test_normal_statistics_and_validation():
    node = build(lambda x: fn.random.normal(mean=2.0, stddev=3.0, shape=(500,)))
    draws = np.concatenate([
        node.op.run_cpu([], {}, SampleContext(SEED, 9, 0, i, 0, 0)) for i in range(40)
    ])
    assert abs(draws.mean() - 2.0) < 0.1 and abs(draws.std() - 3.0) < 0.1
    with pytest.raises(ValueError, match="stddev must be >= 0"):
        build(lambda x: fn.random.normal(stddev=-1.0))
    with pytest.raises(ValueError, match="either shape or a shape_like input"):
        build(lambda x: fn.random.normal(x, shape=(2,)))
    with pytest.raises(TypeError, match=r"unsupported argument.*'seed_offset'"):
        build(lambda x: fn.random.normal(seed_offset=3))


# --- the training pipeline, parallel ---------------------------------------------------------------


def training_graph(data, anchor, shape):
    """DALI's classification example, with this file's ops: decode a region, random crop + resize,
    colour and rotation jitter with random parameters, normalize, CHW, cast."""
    images = fn.decoders.image_slice(data, anchor, shape)
    images = fn.random_resized_crop(images, size=(20, 24))
    images = fn.color_twist(images, hue=fn.random.uniform(range=(-30, 30)),
                            saturation=fn.random.uniform(range=(0.5, 1.5)))
    images = fn.hsv(images, value=fn.random.uniform(range=(0.8, 1.2)))
    images = fn.rotate(images, angle=fn.random.uniform(range=(-15, 15)), keep_size=True, fill_value=0)
    images = fn.normalize(images, axis_names="HW", epsilon=1.0)
    noise = fn.random.normal(images, stddev=0.01)
    return fn.cast(fn.transpose(images, perm=[2, 0, 1]), dtype=types.FLOAT16), noise


def test_training_pipeline_parallel_matches_serial():
    samples = [(png(im), np.float32([0.1, 0.1]), np.float32([0.8, 0.85])) for im in IMAGES]
    _, serial = run_pipeline(training_graph, samples, epochs=2)
    p, parallel = run_pipeline(training_graph, samples, epochs=2, parallel=True, workers=2)
    assert len(serial) == len(parallel) == 8
    for (a, na), (b, nb) in zip(serial, parallel):
        assert a.shape == (3, 20, 24) and a.dtype == np.float16 and nb.shape == (20, 24, 3)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(na, nb)
    assert p.output_layouts[0] == "CHW"
    assert not np.array_equal(serial[0][0], serial[4][0])  # epoch 1 draws new parameters


def test_gpu_devices_without_a_gpu_run_the_cpu_implementation(monkeypatch):
    """Without a usable GPU these ops, asked for device="mixed"/"gpu", run on the CPU (after the
    pipeline's one warning) and give the CPU results."""
    monkeypatch.setattr("ray_extsrc.pipeline._warned_no_gpu", False)

    def graph(device, decoder_device):
        def g(data):
            images = fn.decoders.image_crop(data, crop=(30, 28), device=decoder_device)
            images = fn.color_twist(images, hue=20.0, device=device)
            images = fn.rotate(images, angle=fn.random.uniform(range=(-10, 10)), device=device)
            images = fn.normalize(images, axes=(0, 1), device=device)
            return fn.cast(fn.transpose(images, perm=[2, 0, 1], device=device), dtype=types.FLOAT16, device=device)
        return g

    samples = [(png(im),) for im in IMAGES]
    with pytest.warns(NoGPUWarning, match=r"decoders.image_crop\(device='mixed'\).*color_twist\(device='gpu'\)"):
        _, gpu = run_pipeline(graph("gpu", "mixed"), samples, device_id=0)
    _, cpu = run_pipeline(graph("cpu", "cpu"), samples)
    for (a,), (b,) in zip(gpu, cpu):
        np.testing.assert_array_equal(a, b)


def test_new_ops_survive_pickling():
    """Ops travel to spawned workers and Ray actors by pickle, per-sample markers included."""
    import pickle

    calls = [
        lambda x: fn.decoders.image_crop(x, crop_h=x, crop_w=x),
        lambda x: fn.decoders.image_slice(x, rel_start=x, rel_shape=(0.5, 0.5)),
        lambda x: fn.random_resized_crop(x, size=8),
        lambda x: fn.color_twist(x, hue=x),
        lambda x: fn.hsv(x, value=x),
        lambda x: fn.rotate(x, angle=x, size=x),
        lambda x: fn.cast(x, dtype=types.UINT8),
        lambda x: fn.transpose(x, perm=[1, 0]),
        lambda x: fn.normalize(x, mean=x, stddev=x),
        lambda x: fn.random.normal(mean=x),
    ]
    for call in calls:
        op = build(call).op
        clone = pickle.loads(pickle.dumps(op))
        assert type(clone) is type(op) and vars(clone).keys() == vars(op).keys()
    img = IMAGES[0]
    op = build(lambda x: fn.color_twist(x, hue=x)).op
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(op)).run_cpu([img], {"hue": np.float32(40)}, None),
                                  op.run_cpu([img], {"hue": np.float32(40)}, None))


# --- the GPU paths' array code, run here with NumPy standing in for CuPy -----------------------------
#
# The GPU twins of color_twist, hsv, rotate, normalize, cast and transpose run the CPU op's own
# array functions with xp=cupy (`_gpu.ops`). With a stand-in `cupy` module that is NumPy, the same
# glue (dense batch at once, lists per sample, per-sample argument rows) runs here and must give
# run_cpu's results exactly; tests/gpu/test_gpu_ops_more.py checks the real thing on a GPU.


def _numpy_as_cupy(monkeypatch):
    import sys
    import types as pytypes

    fake = pytypes.ModuleType("cupy")
    fake.__getattr__ = lambda name: getattr(np, name)
    fake.ndarray = np.ndarray
    fake.asnumpy = np.asarray
    monkeypatch.setitem(sys.modules, "cupy", fake)
    from ray_extsrc.fn._gpu import ops

    return ops


def _per_sample(op, samples, args):
    return [op.run_cpu([x], {k: v[j] for k, v in args.items()}, None) for j, x in enumerate(samples)]


def _assert_same(got, want):
    got = list(got) if isinstance(got, np.ndarray) else got
    assert len(got) == len(want)
    for j, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (j, g.dtype, g.shape, w.dtype, w.shape)
        np.testing.assert_array_equal(g, w, err_msg=f"sample {j}")


def test_gpu_glue_color_ops_match_run_cpu_with_numpy(monkeypatch):
    ops = _numpy_as_cupy(monkeypatch)
    dense = np.stack([picture(20, 24, k) for k in range(3)])
    varied = [picture(20, 24, 0), picture(13, 31, 1), picture(40, 8, 2)]
    args = {"hue": [np.float32(v) for v in (-30, 0, 75)], "saturation": [np.float32(v) for v in (0.5, 1.3, 2.0)]}
    for op in (build(lambda x: fn.color_twist(x, hue=x, saturation=x, contrast=1.4, brightness=0.9)).op,
               build(lambda x: fn.hsv(x, hue=x, saturation=x, value=1.2)).op):
        for batch in (dense, varied, [im.astype(np.float32) / 255 for im in varied]):
            samples = list(batch)
            got = op.run_gpu([batch], args, [None] * 3, None)
            assert isinstance(got, np.ndarray) == isinstance(batch, np.ndarray)
            _assert_same(got, _per_sample(op, samples, args))
    hsv_u8_to_f = build(lambda x: fn.hsv(x, value=x, dtype=types.FLOAT)).op
    _assert_same(hsv_u8_to_f.run_gpu([dense], {"value": [np.float32(v) for v in (0.5, 1, 3)]}, [None] * 3, None),
                 _per_sample(hsv_u8_to_f, list(dense), {"value": [np.float32(v) for v in (0.5, 1, 3)]}))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        ops.color_matrix(hsv_u8_to_f, [[dense[0][:, :, :2]]], {"value": [np.float32(1)]}, [None], None)


@pytest.mark.parametrize("interp", [types.INTERP_NN, types.INTERP_LINEAR])
@pytest.mark.parametrize("fill", [None, 7.0])
def test_gpu_glue_rotate_matches_run_cpu_with_numpy(monkeypatch, interp, fill):
    _numpy_as_cupy(monkeypatch)
    dense = np.stack([picture(20, 24, k) for k in range(3)])
    varied = [picture(20, 24, 0), picture(13, 31, 1), picture(40, 9, 2)[:, :, :1]]
    angles = {"angle": [np.float32(v) for v in (-33.0, 90.0, 12.5)]}
    for keep in (True, False):
        op = build(lambda x: fn.rotate(x, angle=x, keep_size=keep, fill_value=fill, interp_type=interp)).op
        for batch in (dense, varied, dense.astype(np.float32)):
            _assert_same(op.run_gpu([batch], angles, [None] * 3, None), _per_sample(op, list(batch), angles))
    op = build(lambda x: fn.rotate(x, angle=x, size=(11, 17), dtype=types.FLOAT, interp_type=interp)).op
    _assert_same(op.run_gpu([dense], angles, [None] * 3, None), _per_sample(op, list(dense), angles))


def test_gpu_glue_normalize_cast_transpose_match_run_cpu_with_numpy(monkeypatch):
    _numpy_as_cupy(monkeypatch)
    dense = np.stack([picture(20, 24, k) for k in range(3)])
    varied = [picture(20, 24, 0), picture(13, 31, 1), picture(40, 9, 2)]
    means = {"mean": [np.float32(v) for v in (100, 120.5, 90)]}
    tensors = {"mean": [np.full((1, 1, 3), v, np.float32) for v in (100, 120.5, 90)],
               "stddev": [np.array([[[40, 50, 60]]], np.float32) * k for k in (1, 2, 3)]}
    cases = [
        (lambda x: fn.normalize(x, axes=(0, 1)), {}),
        (lambda x: fn.normalize(x, epsilon=2.0, scale=64, shift=128, dtype=types.UINT8), {}),
        (lambda x: fn.normalize(x, mean=x, axes=(0, 1), ddof=1), means),
        (lambda x: fn.normalize(x, mean=x, stddev=x), tensors),
        (lambda x: fn.normalize(x, mean=x, stddev=50.0), means),
    ]
    for call, args in cases:
        op = build(call).op
        for batch in (dense, varied):
            _assert_same(op.run_gpu([batch], args, [None] * 3, None), _per_sample(op, list(batch), args))
    floats = [np.array([-1e10, -300.5, -0.5, 0.5, 1.5, 254.5, 255.5, 3e9, np.nan], np.float32)] * 3
    for dt in (types.UINT8, types.INT8, types.INT32, np.uint64, types.FLOAT16, types.BOOL):
        op = build(lambda x: fn.cast(x, dtype=dt)).op
        for batch in (np.stack(floats), floats, dense, varied):
            _assert_same(op.run_gpu([batch], {}, [None] * 3, None), _per_sample(op, list(batch), {}))
    op = build(lambda x: fn.transpose(x, perm=[2, 0, 1])).op
    for batch in (dense, varied):
        _assert_same(op.run_gpu([batch], {}, [None] * 3, None), _per_sample(op, list(batch), {}))
    with pytest.raises(ValueError, match="perm"):
        op.run_gpu([[dense[0][0]]], {}, [None], None)


def test_gpu_glue_region_decoder_windows(monkeypatch):
    """The GPU region decoders compute each window from the decoded size with the CPU op's own
    rules and cut it out of the decoded images (here: a list; on the GPU a pointer batch)."""
    ops = _numpy_as_cupy(monkeypatch)
    images = [picture(40, 30, 0), picture(33, 51, 1)]
    crop = build(lambda x: fn.decoders.image_crop(x, crop=(10, 12), crop_pos_x=x)).op
    sl = build(lambda x: fn.decoders.image_slice(x, rel_start=x, rel_shape=(0.5, 0.25))).op
    rows = [({"crop_pos_x": np.float32(0.3)}, {"rel_start": np.float32([0.1, 0.5])}),
            ({"crop_pos_x": np.float32(1.0)}, {"rel_start": np.float32([0.5, 0.2])})]
    for op, k in ((crop, 0), (sl, 1)):
        sizes = ops.image_sizes(images)
        windows = [op.window(h, w, [png(images[j])], rows[j][k]) for j, (h, w) in enumerate(sizes)]
        got = ops.crop_decoded(images, windows)
        want = [op.run_cpu([png(im)], rows[j][k], None) for j, im in enumerate(images)]
        _assert_same([np.ascontiguousarray(g) for g in got], want)
    with pytest.raises(ValueError, match="does not fit"):
        crop.window(8, 30, [None], {"crop_pos_x": np.float32(0.5)})


# --- the GPU stage's whole-column shortcuts for `Rows` columns, and the kernels' one table upload ----


_MIRRORS = {  # a column of per-sample ``mirror`` values -> the flags (first element != 0)
    "coin_flip": ([np.array(v, np.int32) for v in (1, 0, 1, 1, 0)], [1, 0, 1, 1, 0]),  # 0-d arrays
    "scalars": ([np.int32(v) for v in (0, 3, 0, -1, 0)], [0, 1, 0, 1, 0]),
    "bool": ([np.array([v], bool) for v in (True, False, False, True, True)], [1, 0, 0, 1, 1]),
    "first_of_2d": ([np.array([[v, 1.0]]) for v in (0.0, np.nan, -0.0, 2.5, 0.0)], [0, 1, 0, 1, 0]),
    "uint8": ([np.array([[v, 0]], np.uint8) for v in (0, 255, 1, 0, 0)], [0, 1, 1, 0, 0]),  # 1-D: bytes
}


@pytest.mark.parametrize("name", list(_MIRRORS))
def test_gpu_glue_mirror_flags_of_rows_equal_the_lists(name):
    from ray_extsrc.fn._gpu import ops
    from ray_extsrc.host_batch import Rows, pack_column, unpack_column

    values, want = _MIRRORS[name]
    rows = unpack_column(pack_column(values))
    assert isinstance(rows, Rows)
    got = ops._mirror_flags(None, {"mirror": rows}, len(values))
    old = ops._mirror_flags(None, {"mirror": list(rows)}, len(values))
    assert got.dtype == old.dtype == np.int32 and got.tolist() == old.tolist() == want


def test_gpu_stage_passes_rows_argument_columns_as_they_are(monkeypatch):
    _numpy_as_cupy(monkeypatch)
    from ray_extsrc.executor.gpu_stage import _host_values
    from ray_extsrc.host_batch import pack_column, unpack_column

    rows = unpack_column(pack_column([np.float32(v) for v in (1, 2, 3)]))
    assert _host_values(rows) is rows
    assert [float(v) for v in _host_values([np.float32(4), 5.0])] == [4.0, 5.0]  # other columns: a list


class _Launches:
    """A stand-in for `kernels._kernel`: records each launch's arguments instead of running it."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, dtype):
        return lambda grid, block, args: self.calls.append((name, args))


def _table_checks(tables, keep, want):
    """``tables`` are flat views of the one buffer in ``keep``, 16-byte aligned in it, equal to ``want``."""
    assert len(keep) == 1
    buf = keep[0]
    base = buf.__array_interface__["data"][0]
    ends = []
    for t, w in zip(tables, want, strict=True):
        assert t.dtype == w.dtype and t.shape == (w.size,) and np.array_equal(t, w.reshape(-1)), (t, w)
        if not t.size:
            continue  # NumPy gives an empty view another address
        assert np.shares_memory(t, buf)
        start = t.__array_interface__["data"][0] - base
        assert start % 16 == 0 and start + t.nbytes <= buf.nbytes
        ends.append((start, start + t.nbytes))
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # in order, no overlap


def test_gpu_glue_upload_tables_packs_every_table_into_one_buffer(monkeypatch):
    import sys

    from ray_extsrc.fn._gpu import kernels

    _numpy_as_cupy(monkeypatch)
    uploads = []
    sys.modules["cupy"].asarray = lambda a: (uploads.append(a), np.array(a))[1]  # a device copy
    want = [np.arange(3, dtype=np.uint64) << np.uint64(40), np.arange(15, dtype=np.int32).reshape(5, 3) - 7,
            np.array([0.5, -1, 3], np.float32), np.zeros(0, np.int64), np.arange(3, dtype=np.uint8),
            np.arange(8, dtype=np.float64)[::2]]  # a strided one is packed as its values
    keep = ["earlier"]
    tables = kernels._upload_tables([w.copy() for w in want], keep)
    assert len(uploads) == 1 and keep[0] == "earlier"
    _table_checks(tables, keep[1:], want)
    assert keep[1].nbytes % 16 == 0 and keep[1].dtype == np.uint8


def test_gpu_glue_resize_and_cmn_upload_their_tables_once(monkeypatch):
    import sys

    from ray_extsrc.fn._gpu import kernels
    from ray_extsrc.fn._gpu.ptrbatch import PtrBatch

    _numpy_as_cupy(monkeypatch)
    uploads = []
    sys.modules["cupy"].asarray = lambda a: (uploads.append(a), np.array(a))[1]
    launches = _Launches()
    monkeypatch.setattr(kernels, "_kernel", launches)
    n = 3
    ptrs = np.uint64(1 << 36) + np.arange(n, dtype=np.uint64) * np.uint64(4096)
    dims = np.array([[20, 24, 72], [13, 31, 96], [40, 8, 24]], np.int32)
    batch = PtrBatch(ptrs, dims, 3, [])
    boxes = np.array([[0, 0, 24, 20], [1.5, 2, 30, 13], [0, 0.25, 8, 40]], np.float64)  # cast to float32
    keep = []
    out = kernels.resize(batch, boxes, 5, 7, 2, np.dtype(np.uint8), keep)
    assert out.shape == (n, 5, 7, 3) and len(uploads) == 1
    (name, args), = launches.calls
    assert name == "resize_batch" and args[3] is out
    assert [a.dtype for a in args[5:]] == [np.int32] * 4 and [int(a) for a in args[5:]] == [5, 7, 3, 2]
    _table_checks([args[0], args[1], args[2], args[4]], keep,
                  [ptrs, dims, boxes.astype(np.float32), np.arange(n, dtype=np.int64) * (5 * 7 * 3)])

    uploads.clear()
    launches.calls.clear()
    keep = []
    windows = np.array([[1, 2], [0, 0], [3, 1]], np.int64)
    mirror = np.array([1, 0, 1], np.int32)
    a, b = np.array([1 / 64] * 3, np.float64), np.array([-2.0, -1.5, -1.0], np.float64)
    fill = np.array([0, 128, 255], np.uint8)
    out = kernels.crop_mirror_normalize(batch, windows, mirror, a, b, fill, 6, 4, 4, True, np.dtype(np.float16), keep)
    assert out.shape == (n, 4, 6, 4) and out.dtype == np.float16 and len(uploads) == 1
    (name, args), = launches.calls
    assert name == "cmn_batch" and args[5] is out
    assert [a.dtype for a in args[6:]] == [np.int32] * 5 and [int(v) for v in args[6:]] == [6, 4, 3, 4, 1]
    params = np.array([[1, 2, 1], [0, 0, 0], [3, 1, 1]], np.int32)
    coef = np.concatenate([a, b]).astype(np.float32)
    _table_checks(args[:5], keep, [ptrs, dims, params, coef, fill.astype(np.float32)])


def test_gpu_glue_cmn_dense_path_takes_rows_mirror_flags_like_a_list(monkeypatch):
    from ray_extsrc.fn._gpu import kernels
    from ray_extsrc.host_batch import Rows, pack_column, unpack_column

    ops = _numpy_as_cupy(monkeypatch)
    launches = _Launches()
    monkeypatch.setattr(kernels, "_kernel", launches)
    monkeypatch.setattr(kernels, "hwc_table", lambda images: (  # NumPy arrays have no device pointer
        np.arange(len(images), dtype=np.uint64) * np.uint64(4096),
        np.tile(np.array(images.shape[1:3] + (images.strides[1],), np.int32), (len(images), 1)), images.shape[3]))
    op = build(lambda x: fn.crop_mirror_normalize(x, crop=(8, 10), mirror=x, mean=[1.0, 2, 3], std=[4.0, 5, 6])).op
    dense = np.stack([picture(20, 24, k) for k in range(3)])
    flags = [np.array(v, np.int32) for v in (1, 0, 1)]  # what fn.random.coin_flip gives
    rows = unpack_column(pack_column(flags))
    assert isinstance(rows, Rows)
    got = []
    for mirror in (rows, flags):
        ops.crop_mirror_normalize(op, [dense], {"mirror": mirror}, [None] * 3, None)
        (_, args), = launches.calls
        got.append(args)
        launches.calls.clear()
    assert got[0][2].reshape(3, 3)[:, 2].tolist() == [1, 0, 1]  # params: crop y, crop x, mirror
    rows_args, list_args = got
    for x, y in zip(rows_args[:5] + rows_args[6:], list_args[:5] + list_args[6:], strict=True):  # [5]: out
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
