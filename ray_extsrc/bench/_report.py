"""The R1 benchmark's table and bar chart (matplotlib when present, else drawn with Pillow)."""

from __future__ import annotations

from ._common import timed_rates

__all__ = ["READER_SUFFIXES", "chart", "multi_gpu", "split_reader", "table", "timed_rates"]

#: ``SYSTEM:SUFFIX`` runs a ray_extsrc system (a, b, bN) on the same images through another reader
READER_SUFFIXES = {"folder": "image_folder", "wds": "webdataset"}


def split_reader(system: str) -> tuple[str, str]:
    """``"a:wds"`` -> ``("a", "webdataset")``; a plain ``"a"`` reads the file list."""
    base, sep, suffix = system.partition(":")
    if not sep:
        return system, "file_list"
    if suffix not in READER_SUFFIXES or not (base == "a" or base == "b" or multi_gpu(base)):
        raise ValueError(f"system {system!r}: a reader suffix goes on a, b or bN and is one of "
                         f"{sorted(READER_SUFFIXES)}")
    return base, READER_SUFFIXES[suffix]


def multi_gpu(system: str) -> int:
    """N for a system named ``bN`` (N >= 2: system b on N GPUs), else 0."""
    return int(system[1:]) if system[:1] == "b" and system[1:].isdigit() and int(system[1:]) >= 2 else 0


def _keys(summary: dict) -> list[str]:
    """Systems in table order: a, b, then b on several GPUs (b2, b8, ...), then the peers."""
    multi = sorted((k for k in summary if multi_gpu(k)), key=multi_gpu)
    order = ["a", *(f"a:{r}" for r in READER_SUFFIXES), "b", *(f"b:{r}" for r in READER_SUFFIXES), *multi,
             "c", "d", "e1", "e2"]
    return [k for k in order if k in summary] + [k for k in summary if k not in order]


def table(summary: dict) -> str:
    rows = [f"{'system':<24}{'median img/s':>14}{'epochs (img/s)':>40}{'1st batch s':>12}{'GPU MB':>8}{'RSS MB':>9}"]
    for k in _keys(summary):
        s = summary[k]
        eps = ", ".join(f"{v:.0f}" for v in s["epochs"])
        first = f"{s['startup_to_first_batch_s']:.1f}" if s["startup_to_first_batch_s"] is not None else "-"
        rss = s["tree_rss_mb"] + s.get("loader_tree_rss_mb", 0)  # + the loader actors of b, bN
        rows.append(f"{s['system']:<24}{s['median_images_per_s']:>14.0f}{eps[:38]:>40}{first:>12}"
                    f"{s['gpu_peak_used_mb']:>8}{rss:>9.0f}")
    b = summary.get("b", summary.get("a"))
    if b:
        ref = b["median_images_per_s"]
        dec = max([summary[k]["median_images_per_s"] for k in ("e1", "e2") if k in summary] or [0])
        for name, key in (("best decode-only", None), ("torch DataLoader", "c"), ("Ray Data", "d")):
            other = dec if key is None else summary.get(key, {}).get("median_images_per_s")
            if other:
                rows.append(f"{b['system']} / {name}: {ref / other:.2f}x")
        for k in summary:
            n = multi_gpu(k)
            if n and "b" in summary:
                total = summary[k]["median_images_per_s"]
                rows.append(f"{n} GPUs / 1 GPU (in Train): {total / ref:.2f}x ({total / n:,.0f} img/s per GPU)")
    for k in summary:  # the same system through another reader, against the file list (same run)
        base, _, suffix = k.partition(":")
        if suffix and base in summary:
            ratio = summary[k]["median_images_per_s"] / summary[base]["median_images_per_s"]
            rows.append(f"{summary[k]['system']} / {summary[base]['system']}: {ratio:.2f}x")
    return "\n".join(rows)


def chart(summary: dict, path: str, title: str) -> None:
    keys = _keys(summary)
    names = [summary[k]["system"] for k in keys]
    vals = [summary[k]["median_images_per_s"] for k in keys]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.5))
        bars = ax.barh(names[::-1], vals[::-1], color="#4c72b0")
        for bar, v in zip(bars, vals[::-1]):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,.0f}", va="center")
        ax.set_xlabel("images/s (median of timed epochs)")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    w, h, left = 900, 60 + 40 * len(vals), 220
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 10), title, fill="black")
    top = max(vals) if vals else 1
    for i, (n, v) in enumerate(zip(names, vals)):
        y = 40 + 40 * i
        d.text((10, y + 8), n, fill="black")
        d.rectangle([left, y, left + int((w - left - 100) * v / top), y + 28], fill=(76, 114, 176))
        d.text((left + int((w - left - 100) * v / top) + 5, y + 8), f"{v:,.0f}", fill="black")
    im.save(path)
