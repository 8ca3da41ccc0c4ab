"""Deterministic synthetic JPEG data sets, laid out the way DALI's external-source tutorial reads them.

`make_jpeg_dataset(out_dir, spec)` writes::

    out_dir/
      file_list.txt        one "relative/path.jpg label" line per image (labels 0..num_classes-1)
      manifest.json        the spec, library versions, per-set content hash; written last
      000/000017.jpg       images, one folder per label (also readable as a torchvision ImageFolder)
      ...

``file_list.txt`` is exactly what the tutorial's ``ExternalInputCallable`` parses::

    with open(os.path.join(root, "file_list.txt")) as f:
        files, labels = zip(*[line.rstrip().split(" ") for line in f])

Images are "photo-like" rather than flat colour, because JPEG size and decode cost depend on
high-frequency content: two multi-octave value-noise layers with smooth colour gradients, composited
through a mask of random shapes (hard edges), plus light luminance grain. `R1` is tuned so its mean
file size lands near 67 KB (the reference workload in shared/ANCHORS.md).

Determinism: image ``i`` is drawn from ``Generator(PCG64(SeedSequence([seed, i])))`` and rendered
with integer arithmetic only (uint8 grids upsampled by Pillow's fixed-point resampler, int16 sums,
integer look-up tables; no libm calls whose last bit may differ between CPUs), then encoded by
simplejpeg (libjpeg-turbo bundled in its wheel). So a spec gives byte-identical files, in any
process count, on any machine with the same NumPy, Pillow and simplejpeg versions; the manifest
records those versions and a content hash to compare against.

Command line (the ``ray-extsrc`` CLI wraps `main`)::

    python -m ray_extsrc.synthetic OUT_DIR --preset r1 [--images N] [--seed S] [--processes P]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The layout's reader owns its parsing; re-exported here, where data sets in that layout are written.
from .readers.file_list import FILE_LIST, read_file_list

__all__ = [
    "DatasetSpec",
    "SMALL",
    "R1",
    "PRESETS",
    "GENERATOR_VERSION",
    "make_jpeg_dataset",
    "render_image",
    "encode_image",
    "content_hash",
    "dataset_content_hash",
    "read_file_list",
    "main",
]

# Bump whenever rendering changes what bytes a spec produces: cached directories are then rebuilt.
GENERATOR_VERSION = 1

MANIFEST = "manifest.json"
LOCK = ".synthetic.lock"

_SUBSAMPLING = {"4:4:4": "444", "4:2:2": "422", "4:2:0": "420", "4:4:0": "440", "4:1:1": "411"}

# Below this many images one process is as fast as a pool (SMALL, 64 images, renders in ~0.25 s in
# one process) and the caller is spared child processes altogether.
_MIN_IMAGES_FOR_POOL = 256


@dataclass(frozen=True)
class DatasetSpec:
    """What to generate. Ranges are inclusive ``(low, high)``; each image draws its own size.

    num_images: how many JPEG files.
    width, height: pixel size range of the images.
    quality: JPEG quality (1..100), libjpeg scale.
    subsampling: chroma subsampling, "4:2:0" (baseline, what cameras write), "4:2:2" or "4:4:4".
    seed: data-set seed; image ``i`` depends on ``(seed, i)`` only, so a spec that differs only in
        ``num_images`` shares its first images with the larger one.
    num_classes: labels are drawn uniformly from ``0 .. num_classes - 1``.
    labels_visible: tint every image towards its class's colour, so a classifier can learn the
        labels (examples); off for benchmark sets, whose pixels do not depend on the label.
    """

    num_images: int
    width: tuple[int, int]
    height: tuple[int, int]
    quality: int = 90
    subsampling: str = "4:2:0"
    seed: int = 0
    num_classes: int = 10
    labels_visible: bool = False

    def __post_init__(self) -> None:
        for name in ("num_images", "quality", "seed", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"DatasetSpec.{name} must be an int; got {value!r} ({type(value).__name__})")
        if self.num_images < 1:
            raise ValueError(f"DatasetSpec.num_images must be >= 1; got {self.num_images}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"DatasetSpec.quality must be in 1..100; got {self.quality}")
        if self.seed < 0:
            raise ValueError(f"DatasetSpec.seed must be >= 0; got {self.seed}")
        if not 1 <= self.num_classes <= 1000:
            raise ValueError(f"DatasetSpec.num_classes must be in 1..1000; got {self.num_classes}")
        if self.subsampling not in _SUBSAMPLING:
            raise ValueError(
                f"DatasetSpec.subsampling must be one of {sorted(_SUBSAMPLING)}; got {self.subsampling!r}"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if (
                not isinstance(value, Sequence)
                or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            ):
                raise TypeError(f"DatasetSpec.{name} must be a (low, high) pair of ints; got {value!r}")
            low, high = value
            if not 16 <= low <= high <= 8192:
                raise ValueError(f"DatasetSpec.{name} must satisfy 16 <= low <= high <= 8192; got {value!r}")
            # Lists (e.g. from JSON) become tuples, so specs compare and hash by value.
            object.__setattr__(self, name, (low, high))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DatasetSpec:
        return cls(**{**data, "width": tuple(data["width"]), "height": tuple(data["height"])})


# Demo and tests: generates in ~0.2 s in one process.
SMALL = DatasetSpec(num_images=64, width=(160, 320), height=(120, 240), quality=90, seed=0, num_classes=10)
# The reference workload (shared/ANCHORS.md): 8,000 photo-like images, baseline 4:2:0, quality 90,
# mean file size ~67 KB.
R1 = DatasetSpec(num_images=8000, width=(400, 640), height=(300, 500), quality=90, seed=0, num_classes=10)
PRESETS: dict[str, DatasetSpec] = {"small": SMALL, "r1": R1}


# --------------------------------------------------------------------------------------------------
# Rendering. Integer arithmetic only below (see the module docstring for why).

# Per-pixel grain: one uint16 draw per pixel indexes a table holding the sum of two uniform integers
# in [-A, A] (one per byte) -> triangular noise in [-2A, 2A], standard deviation ~0.9 A, added to
# all three channels (luminance grain, like sensor noise after demosaicing). A is the knob that sets
# R1's mean file size: at quality 90 JPEG size is dominated by how much high-frequency energy
# survives quantisation.
_GRAIN_AMPLITUDE = 6


def _grain_table(amplitude: int) -> np.ndarray:
    one = ((np.arange(256, dtype=np.int32) * (2 * amplitude + 1)) >> 8) - amplitude
    return (one[:, None] + one[None, :]).reshape(-1).astype(np.int16)


_GRAIN_TABLE = _grain_table(_GRAIN_AMPLITUDE)
# Value-noise octaves on the quarter-resolution canvas: grid cells across the longer side and the
# amplitude (in 1/256 of full range) of each. Persistence ~0.67 reads as clouds/foliage/texture.
_OCTAVES = ((2, 200), (4, 140), (8, 90), (16, 60), (32, 40), (64, 26), (128, 18))
_LAYER_DOWNSCALE = 4


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


def _upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic-upsample a uint8 (h, w, 3|4) grid to ``size=(w, h)`` with Pillow's fixed-point resampler.

    Four channels go through as "CMYK", which Pillow resamples channel by channel ("RGBA" would be
    premultiplied by alpha first).
    """
    from PIL import Image

    mode = "RGB" if grid.shape[2] == 3 else "CMYK"
    image = Image.frombuffer(mode, (grid.shape[1], grid.shape[0]), np.ascontiguousarray(grid), "raw", mode, 0, 1)
    return np.asarray(image.resize(size, Image.BICUBIC))


def _layer(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """One textured colour layer, (h, w, 3) uint8: gradient + value noise, rendered small then upsampled."""
    lw, lh = -(-w // _LAYER_DOWNSCALE), -(-h // _LAYER_DOWNSCALE)
    longer = max(lw, lh)
    # Smooth two-colour gradient in a random direction (integer lerp, weights in 0..256).
    c0 = rng.integers(16, 240, 3, dtype=np.int32)
    c1 = rng.integers(16, 240, 3, dtype=np.int32)
    dx, dy = (int(v) for v in rng.integers(-64, 65, 2))
    ramp = np.arange(lw, dtype=np.int32)[None, :] * dx + np.arange(lh, dtype=np.int32)[:, None] * dy
    ramp -= ramp.min()
    ramp = (ramp * 256) // max(int(ramp.max()), 1)
    acc = ((c0 * 256 + (c1 - c0) * ramp[:, :, None]) >> 8) << 8  # (lh, lw, 3) int32, 1/256 units
    # Value noise, one random grid per octave: channel 3 is luminance, channels 0-2 weaker colour.
    for cells, amp in _OCTAVES:
        if cells > longer:
            break
        gw, gh = max(2, -(-cells * lw // longer)) + 1, max(2, -(-cells * lh // longer)) + 1
        noise = _upsample(rng.integers(0, 256, (gh, gw, 4), dtype=np.uint8), (lw, lh)).astype(np.int32) - 128
        acc += noise[:, :, 3:] * amp + ((noise[:, :, :3] * amp) >> 2)
    small = np.clip((acc + 128) >> 8, 0, 255).astype(np.uint8)
    return _upsample(small, (w, h))


def _shape_mask(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w) uint8 mask of random filled shapes with hard edges (0 or 255)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(3, 9))):
        kind = int(rng.integers(0, 3))
        fill = 255 if rng.integers(0, 4) else 0  # mostly add, sometimes cut holes
        if kind == 2:
            n = int(rng.integers(3, 7))
            xs, ys = rng.integers(-w // 8, w + w // 8, n), rng.integers(-h // 8, h + h // 8, n)
            draw.polygon([(int(x), int(y)) for x, y in zip(xs, ys)], fill=fill)
        else:
            x0, x1 = sorted(int(v) for v in rng.integers(-w // 4, w + w // 4, 2))
            y0, y1 = sorted(int(v) for v in rng.integers(-h // 4, h + h // 4, 2))
            (draw.ellipse if kind == 0 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return np.asarray(mask)


def _lines(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A few thin straight strokes (twigs, wires, text-like edges) drawn onto ``img``."""
    from PIL import Image, ImageDraw

    h, w = img.shape[:2]
    pil = Image.fromarray(img, "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = (int(v) for v in rng.integers(0, w, 2))
        y0, y1 = (int(v) for v in rng.integers(0, h, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 5)))
    return np.asarray(pil)


def render_image(spec: DatasetSpec, index: int) -> tuple[np.ndarray, int]:
    """Render image ``index`` of ``spec``: ``(rgb uint8 array of shape (h, w, 3), label)``."""
    if not 0 <= index < spec.num_images:
        raise IndexError(f"image index {index} out of range for a data set of {spec.num_images} images")
    rng = _rng(spec.seed, index)
    label = int(rng.integers(0, spec.num_classes))
    w = int(rng.integers(spec.width[0], spec.width[1] + 1))
    h = int(rng.integers(spec.height[0], spec.height[1] + 1))
    background = _layer(rng, w, h)
    foreground = _layer(rng, w, h)
    mask = _shape_mask(rng, w, h)
    img = np.where(mask[:, :, None] != 0, foreground, background)
    img = _lines(rng, img)
    grain = _GRAIN_TABLE[rng.integers(0, 65536, (h, w), dtype=np.uint16)]
    out = img.astype(np.int16)
    if spec.labels_visible:  # 5/8 picture, 3/8 class colour: survives crops, flips and contrast
        out = (out * 5 + _class_colour(spec, label).astype(np.int16) * 3) >> 3
    out += grain[:, :, None]
    return np.clip(out, 0, 255).astype(np.uint8), label


def _class_colour(spec: DatasetSpec, label: int) -> np.ndarray:
    """A fixed RGB colour per class, the same in every data set (a validation set made with another
    seed must show its classes the same way as the training set)."""
    palette = np.random.Generator(np.random.PCG64(np.random.SeedSequence([0xC01, spec.num_classes]))).integers(
        0, 256, (spec.num_classes, 3), dtype=np.int64
    )
    return palette[label]


def encode_image(rgb: np.ndarray, spec: DatasetSpec) -> bytes:
    """JPEG-encode with simplejpeg (libjpeg-turbo, accurate integer DCT, baseline, no restart markers)."""
    import simplejpeg

    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(rgb),
        quality=spec.quality,
        colorspace="RGB",
        colorsubsampling=_SUBSAMPLING[spec.subsampling],
        fastdct=False,
    )


def _relative_name(index: int, label: int) -> str:
    return f"{label:03d}/{index:06d}.jpg"


# --------------------------------------------------------------------------------------------------
# Writing, caching, hashing.


@dataclass(frozen=True)
class _Written:
    index: int
    name: str
    label: int
    size: int
    sha256: str


def _write_one(job: tuple[str, DatasetSpec, int]) -> _Written:
    out_dir, spec, index = job
    rgb, label = render_image(spec, index)
    data = encode_image(rgb, spec)
    name = _relative_name(index, label)
    path = os.path.join(out_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return _Written(index, name, label, len(data), hashlib.sha256(data).hexdigest())


def content_hash(entries: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over ``(relative name, sha256 of the file)`` pairs, in file-list order."""
    h = hashlib.sha256()
    for name, digest in entries:
        h.update(name.encode())
        h.update(b"\0")
        h.update(digest.encode())
        h.update(b"\n")
    return h.hexdigest()


def _library_versions() -> dict[str, str]:
    import PIL
    import simplejpeg

    return {"numpy": np.__version__, "pillow": PIL.__version__, "simplejpeg": simplejpeg.__version__}


def _load_manifest(out_dir: Path) -> dict | None:
    try:
        with open(out_dir / MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_complete(out_dir: Path, spec: DatasetSpec) -> bool:
    """Cheap completeness check (stat only, no hashing): spec, generator, file list and total size agree."""
    manifest = _load_manifest(out_dir)
    if manifest is None or manifest.get("generator_version") != GENERATOR_VERSION:
        return False
    try:
        if DatasetSpec.from_dict(manifest["spec"]) != spec:
            return False
    except (KeyError, TypeError, ValueError):
        return False
    try:
        listing = (out_dir / FILE_LIST).read_bytes()
        if hashlib.sha256(listing).hexdigest() != manifest.get("file_list_sha256"):
            return False
        names = [line.split(" ")[0] for line in listing.decode().splitlines() if line]
        if len(names) != spec.num_images:
            return False
        total = sum(os.stat(out_dir / name).st_size for name in names)
    except (OSError, UnicodeDecodeError):
        return False
    return total == manifest.get("total_bytes")


def _remove_previous(out_dir: Path) -> None:
    """Delete what an earlier generation wrote here (files it listed), never anything else."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    try:
        names = [line.split(" ")[0] for line in (out_dir / FILE_LIST).read_text().splitlines() if line]
    except (OSError, UnicodeDecodeError):
        names = []
    root = out_dir.resolve()
    dirs = set()
    for name in names:
        path = (out_dir / name).resolve()
        if path.suffix == ".jpg" and root in path.parents:
            path.unlink(missing_ok=True)
            dirs.add(path.parent)
    for d in sorted(dirs, reverse=True):
        if d != root:
            try:
                d.rmdir()
            except OSError:  # not empty: something else lives there; leave it
                pass
    (out_dir / FILE_LIST).unlink(missing_ok=True)


def _default_processes(num_images: int) -> int:
    if num_images < _MIN_IMAGES_FOR_POOL:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, num_images // 64))


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork from a single-threaded caller, spawn otherwise.

    fork starts in milliseconds and leaves nothing behind; spawn also starts multiprocessing's
    resource_tracker, a helper process that lives as long as the caller. But forking a process with
    other threads (a Ray actor, a Jupyter kernel, a tqdm monitor) can copy a lock one of them holds
    into the child, so a threaded caller gets spawn.
    """
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _generate(out_dir: Path, spec: DatasetSpec, processes: int, progress: bool) -> Iterator[_Written]:
    jobs = ((str(out_dir), spec, i) for i in range(spec.num_images))
    with contextlib.ExitStack() as stack:
        if processes <= 1:
            results: Iterable[_Written] = map(_write_one, jobs)
        else:
            # The pool is started before the progress bar: tqdm's monitor thread would rule out fork.
            pool = stack.enter_context(_pool_context().Pool(processes))
            chunk = max(1, min(64, spec.num_images // (processes * 8)))
            results = pool.imap(_write_one, jobs, chunksize=chunk)
        if progress:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                bar = stack.enter_context(
                    tqdm(total=spec.num_images, unit="img", desc=f"synthetic JPEGs -> {out_dir}", leave=False)
                )
                results = _counted(results, bar)
        yield from results


def _counted(results: Iterable[_Written], bar) -> Iterator[_Written]:
    for r in results:
        bar.update()
        yield r


def make_jpeg_dataset(
    out_dir: str | os.PathLike,
    spec: DatasetSpec = SMALL,
    *,
    processes: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate ``spec`` into ``out_dir`` (created if needed) and return it as a `Path`.

    If ``out_dir`` already holds a complete generation of the same spec (same generator version),
    returns at once without touching it. Otherwise any earlier generation there (the files its
    ``file_list.txt`` names) is removed and the set is written afresh; ``manifest.json`` is written
    last, so an interrupted run is never mistaken for a complete one. Concurrent callers on the
    same directory serialise on a lock file in it (``.synthetic.lock``); the later ones find the
    set complete.

    processes: worker processes; default: 1 below 256 images, else the usable cores.
    progress: show a tqdm bar on stderr (if tqdm is installed).

    >>> root = make_jpeg_dataset("/tmp/rx-small", SMALL, progress=False)  # doctest: +SKIP
    >>> files, labels = zip(*[line.rstrip().split(" ") for line in open(root / "file_list.txt")])
    """
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"spec must be a DatasetSpec; got {type(spec).__name__}")
    if processes is not None and (not isinstance(processes, int) or processes < 1):
        raise ValueError(f"processes must be a positive int or None; got {processes!r}")
    out_dir = Path(out_dir)
    if _is_complete(out_dir, spec):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        # Someone else (another actor, another terminal) may have finished it while we waited.
        if _is_complete(out_dir, spec):
            return out_dir
        _remove_previous(out_dir)
        _write_dataset(out_dir, spec, processes, progress)
    return out_dir


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on ``out_dir`` so concurrent callers generate it once, not interleaved."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out_dir / LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_dataset(out_dir: Path, spec: DatasetSpec, processes: int | None, progress: bool) -> None:
    """Render and write every image, then file_list.txt, then (atomically, last) manifest.json."""
    started = time.perf_counter()
    nproc = processes if processes is not None else _default_processes(spec.num_images)
    written = sorted(_generate(out_dir, spec, nproc, progress), key=lambda r: r.index)
    elapsed = time.perf_counter() - started

    listing = "".join(f"{r.name} {r.label}\n" for r in written).encode()
    (out_dir / FILE_LIST).write_bytes(listing)
    sizes = np.array([r.size for r in written], dtype=np.int64)
    manifest = {
        "generator": "ray_extsrc.synthetic",
        "generator_version": GENERATOR_VERSION,
        "spec": spec.to_dict(),
        "encoder": "simplejpeg.encode_jpeg (libjpeg-turbo, accurate DCT)",
        "versions": _library_versions(),
        "num_files": len(written),
        "total_bytes": int(sizes.sum()),
        "mean_bytes": float(sizes.mean()),
        "min_bytes": int(sizes.min()),
        "max_bytes": int(sizes.max()),
        "file_list_sha256": hashlib.sha256(listing).hexdigest(),
        "content_sha256": content_hash((r.name, r.sha256) for r in written),
        "generation_seconds": round(elapsed, 3),
        "processes": nproc,
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def dataset_content_hash(root: str | os.PathLike) -> str:
    """Re-hash the files listed in ``root/file_list.txt`` (compare with manifest["content_sha256"])."""
    root = Path(root)
    return content_hash(
        (name, hashlib.sha256((root / name).read_bytes()).hexdigest()) for name, _ in read_file_list(root)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ray_extsrc.synthetic OUT_DIR [--preset small|r1] [--images N] ...``; returns an exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m ray_extsrc.synthetic", description="Generate a deterministic synthetic JPEG data set."
    )
    parser.add_argument("out_dir", help="directory to write (file_list.txt, manifest.json, NNN/*.jpg)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--images", type=int, help="override the preset's number of images")
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    parser.add_argument("--processes", type=int, help="worker processes (default: all usable cores)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    spec = PRESETS[args.preset]
    overrides = {k: v for k, v in (("num_images", args.images), ("seed", args.seed)) if v is not None}
    try:
        spec = dataclasses.replace(spec, **overrides)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    root = make_jpeg_dataset(args.out_dir, spec, processes=args.processes, progress=not args.no_progress)
    manifest = _load_manifest(root) or {}
    print(
        f"{root}: {manifest.get('num_files')} images, mean {manifest.get('mean_bytes', 0) / 1000:.1f} KB, "
        f"content_sha256 {manifest.get('content_sha256', '')[:16]}..., {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
