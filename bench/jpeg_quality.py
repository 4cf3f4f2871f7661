"""Stored JPEG quality against decode speed and pixel error (issue 17's candidate "the stored JPEG quality, if it
buys speed without moving the paper's pixels").

For each source image: the paper's pixels (shorter side 256, central 256 x 256, as preprocessing makes them), stored
at each quality and chroma, then decoded by this project's decoder (simplejpeg) on one core. Printed per setting:
bytes an image, decode time an image and its speed as a ratio to the default (quality 95, 4:2:0) timed in the same
process, and the error of the decoded pixels against the paper's pixels (mean absolute, in grey levels; PSNR; the
share of values off by more than 2 grey levels).

    python bench/jpeg_quality.py [--source bench/out/input-tree-16000/train] [--images 500]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from alexnet.augment import decode_hwc
from alexnet.imaging import decode_rgb, encode_jpeg, resize_center_crop

SETTINGS = [(95, "420"), (90, "420"), (85, "420"), (75, "420"), (95, "444"), (90, "444")]


def paper_pixels(source: Path, count: int, size: int) -> list[np.ndarray]:
    files = sorted(p for p in source.rglob("*") if p.is_file())
    step = max(1, len(files) // count)
    return [resize_center_crop(decode_rgb(f.read_bytes(), size), size) for f in files[::step][:count]]


def decode_seconds(jpegs: list[bytes], repeats: int) -> float:
    """Best of `repeats` passes, seconds an image."""
    out = np.empty_like(decode_hwc(jpegs[0]))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for jpeg in jpegs:
            decode_hwc(jpeg, out)
        best = min(best, (time.perf_counter() - start) / len(jpegs))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("bench/out/input-tree-16000/train"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="settings timed in turn this many times (drift)")
    args = parser.parse_args()

    import torch
    torch.set_num_threads(1)
    pixels = paper_pixels(args.source, args.images, args.size)
    stored = {s: [encode_jpeg(p, *s) for p in pixels] for s in SETTINGS}
    times: dict[tuple[int, str], list[float]] = {s: [] for s in SETTINGS}
    for _, s in itertools.product(range(args.rounds), SETTINGS):  # interleaved, so drift hits every setting
        times[s].append(decode_seconds(stored[s], args.repeats))
    base = min(times[SETTINGS[0]])
    print(f"{len(pixels)} images from {args.source}, {args.size} px; decode: simplejpeg, one core, best of "
          f"{args.rounds} x {args.repeats} passes")
    print(f"{'quality':>7} {'chroma':>6} {'KB/img':>7} {'ms/img':>7} {'speed':>6} {'mean|d|':>8} {'PSNR dB':>8} "
          f"{'>2 levels':>9}")
    for s in SETTINGS:
        decoded = np.stack([decode_hwc(j) for j in stored[s]]).astype(np.int16)
        diff = np.abs(decoded - np.stack(pixels).astype(np.int16))
        mse = float(np.mean(diff.astype(np.float64) ** 2))
        t = min(times[s])
        print(f"{s[0]:>7} {s[1]:>6} {np.mean([len(j) for j in stored[s]]) / 1024:>7.1f} {t * 1e3:>7.3f} "
              f"{base / t:>5.2f}x {diff.mean():>8.2f} {10 * np.log10(255 ** 2 / mse):>8.1f} "
              f"{(diff > 2).mean():>8.1%}")


if __name__ == "__main__":
    main()
