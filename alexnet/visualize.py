"""PNG pictures for MLflow: the mean image and the first-layer kernels (the paper's Figure 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


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


def save_kernel_png(model, path: Path) -> Path:
    """The model's conv1 kernels as a PNG (for MLflow); returns the path."""
    image_to_png(kernel_grid(model.first_layer_kernels()), path)
    return Path(path)


def neighbour_grid_png(rows: list[dict], crop: int, path: Path, tile: int = 96, gap: int = 4) -> Path:
    """Figure 4's layout: one row per query, the query (val) image, a gap, then its nearest training images.

    rows: [{"query_jpeg": bytes, "neighbours": [{"jpeg": bytes}, ...]}, ...]; each image is shown as
    its centre `crop` patch scaled to `tile` pixels.
    """
    import io

    def patch(jpeg: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        left, top = (img.width - crop) // 2, (img.height - crop) // 2
        return img.crop((left, top, left + crop, top + crop)).resize((tile, tile), Image.Resampling.BILINEAR)

    cols = 1 + max((len(r["neighbours"]) for r in rows), default=0)
    width = cols * (tile + gap) + 3 * gap
    canvas = Image.new("RGB", (width, max(1, len(rows)) * (tile + gap) + gap), "white")
    for i, row in enumerate(rows):
        y = gap + i * (tile + gap)
        canvas.paste(patch(row["query_jpeg"]), (gap, y))
        for j, n in enumerate(row["neighbours"]):
            canvas.paste(patch(n["jpeg"]), (4 * gap + (j + 1) * (tile + gap), y))
    canvas.save(path)
    return Path(path)
