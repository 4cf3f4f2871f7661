"""A small ImageNet-style tree of real image files, deterministic from a seed.

Each class is a coloured, patterned blob near the centre of a noisy background (hue and
pattern set by the class), so a small CNN learns it after the paper's central crop. The tree
carries ImageNet's quirks: CMYK and greyscale JPEGs, a PNG named .JPEG, plus palette,
RGBA and 16-bit files; optionally broken files (truncated, empty, random bytes, text).

    python -m alexnet.sample --output demo/imagenet-sample --num-classes 10
    python -m alexnet.sample --output demo/ilsvrc --download-format ilsvrc-archives  # packed as image-net.org ships it
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from alexnet.config import ConfigBase, UsageError, field

# Which image of which class carries which quirk: (class index, image index) -> kind.
QUIRKS = {(0, 0): "cmyk", (1, 0): "png_named_jpeg", (0, 1): "grey", (1, 1): "grey",
          (2, 0): "cmyk", (2, 1): "palette_alpha", (3, 0): "rgba_png", (3, 1): "grey16_png"}
BROKEN_KINDS = ("truncated", "empty", "random_bytes", "text")


@dataclasses.dataclass(frozen=True)
class SampleConfig(ConfigBase):
    output: Path = field(help="folder to create the tree in")
    num_classes: int = field(10, help="number of classes (wnid folders)")
    train_per_class: int = field(60, help="training images per class")
    val_per_class: int = field(12, help="validation images per class")
    seed: int = field(0, help="everything is a function of this seed")
    val_layout: str = field("flat", help="val/ as flat files + LOC_val_solution.csv, or class folders",
                            choices=("flat", "folders"))
    quirks: bool = field(True, help="include CMYK/greyscale/PNG-named-.JPEG/palette/RGBA/16-bit files")
    broken: int = field(0, help="number of broken files to add to train/ (and one to val/)")
    min_side: int = field(60, help="smallest side of a generated image")
    max_side: int = field(500, help="largest side of a generated image")
    large_fraction: float = field(0.0, help="fraction of images with a side >= 1000 px (ImageNet-like)")
    workers: int = field(1, help="processes used to write the images")
    download_format: str = field("tree", help="write the extracted tree, or pack it as ImageNet is downloaded: "
                                 "image-net.org's ILSVRC2012 archives or the Hugging Face Parquet release",
                                 choices=("tree", "ilsvrc-archives", "hf-parquet"))

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.train_per_class < 1 or self.val_per_class < 0:
            raise UsageError("--num-classes and --train-per-class must be >= 1, --val-per-class >= 0")
        if not 8 <= self.min_side <= self.max_side:
            raise UsageError("need 8 <= --min-side <= --max-side")


def wnid(k: int) -> str:
    """Fake but well-formed WordNet ids, increasing with k (so sorted order is class order)."""
    return f"n{1440764 + 7919 * k:08d}"


def _render(cls: int, num_classes: int, rng: np.random.Generator, cfg: SampleConfig) -> np.ndarray:
    if rng.random() < cfg.large_fraction:
        w, h = int(rng.integers(1000, 1600)), int(rng.integers(700, 1200))
    else:
        w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
    if rng.random() < 0.5:
        w, h = h, w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Photo-like noise: mostly luminance, a little chroma.
    background = rng.uniform(60, 190) + rng.normal(0, 20, size=(h, w, 1)) + rng.normal(0, 4, size=(h, w, 3))
    # The blob sits near the centre and is big enough to survive the central crop.
    m = min(w, h)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * m, h / 2 + rng.uniform(-0.1, 0.1) * m
    rx, ry = rng.uniform(0.25, 0.45, size=2) * m
    inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    hue = (cls / num_classes + rng.uniform(-0.2, 0.2) / num_classes) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))) * 255
    period = m * rng.uniform(0.08, 0.12)
    pattern = cls % 4  # solid, vertical stripes, horizontal stripes, checks: all survive a horizontal flip
    waves = {0: np.ones_like(xx), 1: np.sin(xx / period * np.pi), 2: np.sin(yy / period * np.pi),
             3: np.sin(xx / period * np.pi) * np.sin(yy / period * np.pi)}[pattern]
    shade = 0.65 + 0.35 * np.sign(waves)[..., None]
    image = np.where(inside[..., None], colour * shade + rng.normal(0, 8, size=(h, w, 1)), background)
    return np.clip(image, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, kind: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif kind == "grey":
        img.convert("L").save(buf, "JPEG", quality=quality)
    elif kind == "png_named_jpeg":
        img.save(buf, "PNG")
    elif kind == "palette_alpha":
        pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        pal.save(buf, "PNG", transparency=0)
    elif kind == "rgba_png":
        alpha = Image.new("L", img.size, 255)
        img.putalpha(alpha)
        img.save(buf, "PNG")
    elif kind == "grey16_png":
        grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(buf, "PNG")  # 16-bit greyscale; Pillow opens it as I;16 / I
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _broken_bytes(kind: str, rng: np.random.Generator, cfg: SampleConfig) -> bytes:
    if kind == "truncated":
        good = _encode(_render(0, 1, rng, cfg), "jpeg", 90)
        return good[: len(good) // 3]
    if kind == "empty":
        return b""
    if kind == "random_bytes":
        return rng.bytes(2048)
    return b"this is not an image\n"


def _write_one(job: tuple) -> None:
    path, cls, num_classes, key, kind, cfg = job
    rng = np.random.default_rng(key)
    if kind in BROKEN_KINDS:
        data = _broken_bytes(kind, rng, cfg)
    else:
        data = _encode(_render(cls, num_classes, rng, cfg), kind, int(rng.integers(75, 96)))
    Path(path).write_bytes(data)


def make_sample(cfg: SampleConfig) -> dict:
    """Write the tree; returns a manifest of what was written (counts, quirks, broken files)."""
    root = Path(cfg.output)
    wnids = [wnid(k) for k in range(cfg.num_classes)]
    jobs, quirks, broken = [], {}, []
    for k, w in enumerate(wnids):
        (root / "train" / w).mkdir(parents=True, exist_ok=True)
        for i in range(cfg.train_per_class):
            kind = QUIRKS.get((k, i), "jpeg") if cfg.quirks else "jpeg"
            path = root / "train" / w / f"{w}_{i}.JPEG"
            jobs.append((path, k, cfg.num_classes, [cfg.seed, 0, k, i], kind, cfg))
            if kind != "jpeg":
                quirks[str(path.relative_to(root))] = kind
    val_dir = root / "val"
    val_dir.mkdir(parents=True, exist_ok=True)
    val_rows = []
    order = np.random.default_rng([cfg.seed, 1]).permutation(cfg.num_classes * cfg.val_per_class)
    for n, j in enumerate(order, start=1):
        k = int(j) // cfg.val_per_class
        image_id = f"ILSVRC2012_val_{n:08d}"
        folder = val_dir / wnids[k] if cfg.val_layout == "folders" else val_dir
        folder.mkdir(exist_ok=True)
        jobs.append((folder / f"{image_id}.JPEG", k, cfg.num_classes, [cfg.seed, 1, int(j)], "jpeg", cfg))
        val_rows.append((image_id, wnids[k]))
    for b in range(cfg.broken):
        kind = BROKEN_KINDS[b % len(BROKEN_KINDS)]
        path = root / "train" / wnids[b % cfg.num_classes] / f"{wnids[b % cfg.num_classes]}_broken{b}.JPEG"
        jobs.append((path, 0, 1, [cfg.seed, 2, b], kind, cfg))
        broken.append(str(path.relative_to(root)))
    if cfg.broken and val_rows:
        image_id = f"ILSVRC2012_val_{len(val_rows) + 1:08d}"
        folder = val_dir / wnids[0] if cfg.val_layout == "folders" else val_dir
        jobs.append((folder / f"{image_id}.JPEG", 0, 1, [cfg.seed, 3], "truncated", cfg))
        val_rows.append((image_id, wnids[0]))
        broken.append(str((folder / f"{image_id}.JPEG").relative_to(root)))

    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=64))
    else:
        for job in jobs:
            _write_one(job)

    if cfg.val_layout == "flat":
        lines = ["ImageId,PredictionString"] + [f"{i},{w} 10 10 100 100" for i, w in val_rows]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} sample class {k}\n" for k, w in enumerate(wnids)))
    return {"wnids": wnids, "train": cfg.num_classes * cfg.train_per_class + cfg.broken,
            "val": len(val_rows), "quirks": quirks, "broken": broken}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = SampleConfig.parse_args(argv, description=__doc__.splitlines()[0])
        if cfg.download_format == "tree":
            manifest = make_sample(cfg)
        else:
            import tempfile

            from alexnet.packing import pack_hf, pack_ilsvrc

            with tempfile.TemporaryDirectory() as tmp:
                manifest = make_sample(dataclasses.replace(cfg, output=Path(tmp) / "tree"))
                pack = pack_ilsvrc if cfg.download_format == "ilsvrc-archives" else pack_hf
                pack(Path(tmp) / "tree", cfg.output, cfg.seed)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['train']} train and {manifest['val']} val files in "
          f"{len(manifest['wnids'])} classes to {cfg.output}"
          + ("" if cfg.download_format == "tree" else f", packed as {cfg.download_format}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
