"""PNG pictures for MLflow: the mean image and the first-layer kernels (the paper's Figure 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TEXT = 14  # pixels per line of text


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def image_to_png(pixels: np.ndarray, path: Path) -> None:
    """Write a (H, W, 3) uint8 array as PNG (to any file name, e.g. a temporary one)."""
    Image.fromarray(pixels).save(path, format="PNG")


def kernel_grid(rows: list, scale: int = 3, gap: int = 1) -> np.ndarray:
    """First-layer kernels as one (H, W, 3) uint8 picture, one row per list entry (Figure 3).

    Each kernel is stretched to the full 0-255 range on its own, so its structure shows.
    """
    rows = [np.asarray(r, dtype=np.float64) for r in rows]   # each (K, 3, k, k)
    k = rows[0].shape[-1] * scale
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (k + gap) + gap, cols * (k + gap) + gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, w in enumerate(row):
            w = w.transpose(1, 2, 0)
            w = (w - w.min()) / max(w.max() - w.min(), 1e-12) * 255
            tile = np.kron(w, np.ones((scale, scale, 1)))
            y, x = gap + i * (k + gap), gap + j * (k + gap)
            canvas[y:y + k, x:x + k] = np.rint(tile).astype(np.uint8)
    return canvas


def labelled_kernels(rows: list, scale: int = 6, gap: int = 2) -> Image.Image:
    """Figure 3 a person can read: the kernels enlarged, a title, and each row named by its tower."""
    grid = kernel_grid(rows, scale, gap)
    k = np.asarray(rows[0]).shape[-1]
    label_w = 64
    canvas = Image.new("RGB", (label_w + grid.shape[1], TEXT + 6 + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label_w, TEXT + 6))
    draw, font = ImageDraw.Draw(canvas), _font()
    total = sum(len(r) for r in rows)
    draw.text((4, 2), f"conv1: {total} kernels of {k}x{k}x3, each stretched to its own range (the paper's "
                      "Figure 3)", fill="black", font=font)
    for i, row in enumerate(rows):
        y = TEXT + 6 + gap + i * (k * scale + gap) + (k * scale - TEXT) // 2
        draw.text((4, y), f"tower {i + 1}" if len(rows) > 1 else "conv1", fill="black", font=font)
        draw.text((4, y + TEXT), f"{len(row)} kernels", fill="grey", font=font)
    return canvas


def save_kernel_png(model, path: Path) -> Path:
    """The model's conv1 kernels as a PNG (for MLflow), enlarged and labelled by tower; returns the path."""
    labelled_kernels(model.first_layer_kernels()).save(path, format="PNG")
    return Path(path)


def neighbour_grid_png(rows: list[dict], crop: int, path: Path, tile: int = 96, gap: int = 4) -> Path:
    """Figure 4 in full: per query (a validation image, its true class under it), the model's five most likely
    classes with their probabilities (the paper's left panel; the true class in green), then its nearest
    training images in fc7 with their distances (the right panel).

    rows: [{"query_jpeg": bytes, "truth": name, "top5": [(name, probability, is_truth)], "neighbours":
    [{"jpeg": bytes, "distance": float}, ...]}, ...]; each image is shown as its centre `crop` patch scaled to
    `tile` pixels.
    """
    import io

    def patch(jpeg: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        left, top = (img.width - crop) // 2, (img.height - crop) // 2
        return img.crop((left, top, left + crop, top + crop)).resize((tile, tile), Image.Resampling.BILINEAR)

    def short(name: str, n: int = 26) -> str:
        name = name.split(",")[0]
        return name if len(name) <= n else name[: n - 1] + "~"

    panel, bar = 200, 60
    cols = max((len(r["neighbours"]) for r in rows), default=0)
    row_h = max(tile + TEXT, 5 * TEXT) + gap
    left = gap + tile + gap + panel
    width = left + 3 * gap + cols * (tile + gap)
    canvas = Image.new("RGB", (width, TEXT + 2 * gap + max(1, len(rows)) * row_h), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((gap, gap), "query (true class) | top-5 predictions", fill="black", font=font)
    draw.text((left + 3 * gap, gap), "nearest training images in fc7 (Euclidean distance)", fill="black", font=font)
    for i, row in enumerate(rows):
        y = TEXT + 2 * gap + i * row_h
        canvas.paste(patch(row["query_jpeg"]), (gap, y))
        draw.text((gap, y + tile), short(row.get("truth", ""), 16), fill="black", font=font)
        for j, (name, prob, is_truth) in enumerate(row.get("top5", [])):
            ty = y + j * TEXT
            x0 = gap + tile + gap
            draw.rectangle((x0, ty + 2, x0 + max(1, round(bar * prob)), ty + TEXT - 3),
                           fill="green" if is_truth else "red")
            draw.text((x0 + bar + 4, ty), f"{100 * prob:4.1f}% {short(name)}", fill="black", font=font)
        for j, n in enumerate(row["neighbours"]):
            x = left + 3 * gap + j * (tile + gap)
            canvas.paste(patch(n["jpeg"]), (x, y))
            if "distance" in n:
                draw.text((x, y + tile), f"d {n['distance']:.3g}", fill="black", font=font)
    canvas.save(path)
    return Path(path)
