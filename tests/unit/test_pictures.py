"""The pictures logged to MLflow carry what a person needs to read them: labels, captions, scores."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from alexnet.model import ModelConfig, build_model
from alexnet.visualize import kernel_grid, labelled_kernels, neighbour_grid_png


def _dark(region: np.ndarray) -> int:
    return int((region.min(axis=-1) < 128).sum())


def test_conv1_kernels_are_enlarged_with_a_title_and_a_label_per_tower():
    rows = build_model(ModelConfig(arch="paper", width=0.25)).first_layer_kernels()
    picture = np.asarray(labelled_kernels(rows, scale=6, gap=2))
    grid = kernel_grid(rows, 6, 2)
    assert picture.shape[0] > grid.shape[0] and picture.shape[1] == 64 + grid.shape[1]
    assert grid.shape[0] == 2 * (11 * 6 + 2) + 2  # each 11x11 kernel drawn 66 px high
    top = picture.shape[0] - grid.shape[0]
    assert _dark(picture[:top]) > 50  # the title
    for i in range(2):  # "tower 1", "tower 2" beside their rows
        y = top + 2 + i * 68
        assert _dark(picture[y:y + 68, :60]) > 20


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_figure4_shows_the_top5_panel_with_the_true_class_and_distances(tmp_path):
    rows = [{"query_jpeg": _jpeg((0, 0, 255)), "truth": "tench, Tinca tinca",
             "top5": [("goldfish", 0.5, False), ("tench, Tinca tinca", 0.25, True), ("a", 0.1, False),
                      ("b", 0.1, False), ("c", 0.05, False)],
             "neighbours": [{"jpeg": _jpeg((255, 255, 0)), "distance": 12.5} for _ in range(3)]}]
    picture = np.asarray(Image.open(neighbour_grid_png(rows, 32, tmp_path / "f4.png", tile=96, gap=4)))
    y0, x0 = 14 + 8, 4 + 96 + 4  # the first row, the left panel
    bars = picture[y0:y0 + 5 * 14, x0:x0 + 61]
    red = (bars[..., 0] > 200) & (bars[..., 1] < 80)
    green = (bars[..., 1] > 100) & (bars[..., 0] < 80)
    assert red[:14].sum(axis=1).max() == 31 and green[14:28].sum(axis=1).max() == 16  # 50% and 25% of 60 px
    assert not green[:14].any() and not red[14:28].any()  # the true class is the green one
    assert _dark(picture[y0 + 96:y0 + 96 + 14, 4:100]) > 10  # its name under the query
    nx = x0 + 200 + 12
    assert _dark(picture[y0 + 96:y0 + 96 + 14, nx:nx + 96]) > 10  # a distance under each neighbour
