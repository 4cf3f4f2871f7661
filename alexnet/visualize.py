"""PNG pictures for MLflow: the mean image and the first-layer kernels (the paper's Figure 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def image_to_png(pixels: np.ndarray, path: Path) -> None:
    """Write a (H, W, 3) uint8 array as PNG (to any file name, e.g. a temporary one)."""
    Image.fromarray(pixels).save(path, format="PNG")
