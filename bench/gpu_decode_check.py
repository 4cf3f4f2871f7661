"""nvJPEG (torchvision.io.decode_jpeg on CUDA) vs libjpeg-turbo (the CPU path): pixel differences.

    python bench/gpu_decode_check.py [PREPARED_OUTPUT]     # on a GPU machine
Rows: random-noise JPEGs with 4:2:0 and 4:4:4 chroma, and (given an output) its stored training JPEGs.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg


def diff_stats(jpegs: list[bytes]) -> str:
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    cpu = [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]
    gpu = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
    d = np.concatenate([(g.cpu().int() - c.int()).abs().flatten().numpy() for g, c in zip(gpu, cpu)])
    return (f"max {d.max()}  mean {d.mean():.4f}  share >1: {(d > 1).mean():.5f}  p99.99 {np.percentile(d, 99.99):.0f}"
            f"  ({len(jpegs)} images)")


def jpeg(pixels: np.ndarray, subsampling: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, subsampling=subsampling)
    return buf.getvalue()


def main() -> None:
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(32)]
    print("noise 4:2:0  ", diff_stats([jpeg(p, 2) for p in noise]))
    print("noise 4:4:4  ", diff_stats([jpeg(p, 0) for p in noise]))
    if len(sys.argv) > 1:
        from alexnet.prepared import read_prepared
        import pyarrow.parquet as pq

        prepared = read_prepared(sys.argv[1])
        images = pq.read_table(prepared.train_files[0], columns=["image"])["image"].to_pylist()[:512]
        print("stored 4:2:0 ", diff_stats(images))
        decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[:256]]
        print("stored re-encoded 4:4:4", diff_stats([jpeg(p, 0) for p in decoded]))


if __name__ == "__main__":
    main()
