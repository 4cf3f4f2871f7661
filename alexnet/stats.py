"""Training-set statistics: the per-pixel mean image and the PCA of RGB pixel values.

Accumulated per shard as exact integer moments of the uint8 pixels (sums and 3x3 sums of
products cannot round), saved next to the shard, and reduced once at the end in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


@dataclass
class PixelMoments:
    """Sum image and RGB cross-products of a set of (S, S, 3) uint8 images."""

    sum_image: np.ndarray       # (S, S, 3): uint32 within a shard (< 16.8 M images), int64 once merged
    rgb_outer: np.ndarray       # (3, 3) uint64: sum of x x^T over all pixels
    images: int = 0

    @classmethod
    def zeros(cls, size: int) -> "PixelMoments":
        return cls(np.zeros((size, size, 3), np.uint32), np.zeros((3, 3), np.uint64))

    def add(self, pixels: np.ndarray) -> None:
        np.add(self.sum_image, pixels, out=self.sum_image)
        planes = pixels.reshape(-1, 3).T.astype(np.uint64)  # integer dot products: exact, and BLAS-free
        for i, j in _PAIRS:
            self.rgb_outer[i, j] += np.dot(planes[i], planes[j])
        self.images += 1

    def merge(self, other: "PixelMoments") -> None:
        self.sum_image = self.sum_image.astype(np.int64) + other.sum_image
        self.rgb_outer += other.rgb_outer
        self.images += other.images

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, sum_image=self.sum_image, rgb_outer=self.rgb_outer, images=np.int64(self.images))

    @classmethod
    def load(cls, path: Path) -> "PixelMoments":
        with np.load(path) as z:
            return cls(z["sum_image"], z["rgb_outer"], int(z["images"]))

    @property
    def pixels(self) -> int:
        return self.images * self.sum_image.shape[0] * self.sum_image.shape[1]

    def mean_image(self) -> np.ndarray:
        """(S, S, 3) float32 RGB mean on the 0-255 scale."""
        return (self.sum_image / self.images).astype(np.float32)

    def pca(self) -> dict:
        """PCA of RGB values scaled to [0, 1], the scale the paper's colour augmentation uses."""
        n = self.pixels
        mean = self.sum_image.sum(axis=(0, 1), dtype=np.int64) / n / 255.0
        upper = np.triu(self.rgb_outer.astype(np.float64))
        second = upper + np.triu(upper, 1).T
        cov = second / n / 255.0**2 - np.outer(mean, mean)
        eigenvalues, eigenvectors = np.linalg.eigh(cov)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        # eigh's signs are arbitrary; make each vector's largest component positive, for stable files.
        signs = np.sign(eigenvectors[np.abs(eigenvectors).argmax(axis=0), range(3)])
        eigenvectors = eigenvectors * signs
        return {
            "scale": "rgb/255",
            "pixel_count": int(n),
            "image_count": int(self.images),
            "mean_rgb": mean.tolist(),
            "covariance": cov.tolist(),
            "eigenvalues": eigenvalues.tolist(),
            "eigenvectors": eigenvectors.tolist(),  # columns are the principal components
        }

