"""The paper's augmentation, split where each part is cheapest.

Ray Data's CPU tasks (numpy, uint8, per epoch, freshly drawn): decode the stored JPEG, take a
random `crop`x`crop` patch, flip half of them, and draw the PCA lighting offset.  The batch
travels as uint8 (4x smaller than float), and the training device finishes it in one pass:
subtract the mean image cropped and flipped the same way, add the lighting, scale.

Pixel scale: stored pixels are 0-255; `pca.json` holds eigenvalues/eigenvectors of pixels
scaled to [0, 1], so the lighting offset is multiplied by 255 here.
"""

from __future__ import annotations

import itertools

import numpy as np
import simplejpeg
import torch

# The paper's 10 test patches: four corners and the centre, each also flipped.
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


def decode_hwc(jpeg: bytes, into: np.ndarray | None = None) -> np.ndarray:
    """One stored shard image -> (S, S, 3) uint8 RGB, by simplejpeg (libjpeg-turbo, bundled in its wheel);
    written into `into` (a view of it returned) where given: an image that does not fit raises ValueError.

    The same pixels as torchvision's and Pillow's decoders (a unit test compares them), 1.2x torchvision's
    speed on a core here (bench/input_speed.py), and strict: corrupt data raises instead of decoding to
    grey blocks.
    """
    return simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=into)


def decode_image(jpeg: bytes) -> np.ndarray:
    """One stored shard image -> (3, S, S) uint8."""
    return np.ascontiguousarray(decode_hwc(jpeg).transpose(2, 0, 1))


def decode_images(jpegs) -> np.ndarray:
    """Stored JPEG bytes -> (N, 3, S, S) uint8."""
    return np.stack([decode_image(b) for b in jpegs])


def _decode_or_none(jpeg, size: int | None, into: np.ndarray | None = None) -> np.ndarray | None:
    """(S, S, 3), or None where the stored image does not decode (to S x S, where `size` is given); see
    decode_hwc for `into`."""
    try:
        image = decode_hwc(jpeg, into)
    except (RuntimeError, ValueError, TypeError):
        return None
    return image if size is None or image.shape == (size, size, 3) else None


def _decode_all(jpegs, size: int | None) -> tuple[list[np.ndarray | None], int]:
    """Each stored image as (S, S, 3), or None where it does not decode to S x S; S: `size`, else that of the
    first image that decodes."""
    images = [_decode_or_none(jpeg, None) for jpeg in jpegs]
    size = size or next((im.shape[0] for im in images if im is not None), 1)
    return [im if im is not None and im.shape == (size, size, 3) else None for im in images], size


def decode_checked(jpegs, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((N, 3, S, S) uint8, (N,) bool valid): a stored image that does not decode to S x S (a JPEG damaged
    inside an intact shard) stays in the batch as zeros, marked invalid, so that every worker keeps its
    batch count (DDP steps in lockstep); its loss and hits are masked out. S: `size`, else the first
    image that decodes."""
    images, size = _decode_all(jpegs, size)
    out = np.zeros((len(images), 3, size, size), np.uint8)
    for i, im in enumerate(images):
        if im is not None:
            out[i] = im.transpose(2, 0, 1)
    return out, np.array([im is not None for im in images], dtype=bool)


def lighting(alphas: np.ndarray, eigenvalues: np.ndarray, eigenvectors: np.ndarray) -> np.ndarray:
    """(N, 3) RGB offsets on the 0-255 scale: [p1 p2 p3] [a1*l1, a2*l2, a3*l3]^T per image."""
    return (255.0 * (alphas * eigenvalues) @ np.asarray(eigenvectors).T).astype(np.float32)


def draw_augmentation(n: int, size: int, crop: int, eigenvalues: np.ndarray, eigenvectors: np.ndarray,
                      sigma: float, rng: np.random.Generator | None = None) -> dict:
    """Random draws for n images from `rng` (training: seeded by seed, epoch, worker and read task; else OS
    entropy): crop offsets, flips, lighting offsets."""
    rng = rng or np.random.default_rng()
    offsets = np.stack([rng.integers(0, size - crop + 1, n), rng.integers(0, size - crop + 1, n)], 1)
    alphas = rng.normal(0.0, sigma, (n, 3)) if sigma > 0 else np.zeros((n, 3))
    return {"offset": offsets.astype(np.int32), "flip": rng.random(n) < 0.5,
            "light": lighting(alphas, np.asarray(eigenvalues), np.asarray(eigenvectors))}


def train_batch(batch: dict, *, crop: int, eigenvalues: np.ndarray, eigenvectors: np.ndarray,
                sigma: float, size: int | None = None, rng: np.random.Generator | None = None) -> dict:
    """--decode cpu, in Ray Data's read tasks: stored JPEGs -> random (N, crop, crop, 3) patches, flipped where
    `flip`, lighting offsets (and `valid`, see decode_checked).

    Patches stay channels-last, as decoded: each is one contiguous copy out of its image, made while the image
    is still in the cache (a channels-first copy cost 4x as much, 0.12 ms an image of the read task's 0.6 ms,
    measured here). The worker views them as (N, 3, crop, crop) with channels-last strides (`patches_nchw`).
    """
    n = len(batch["image"])
    images = iter(batch["image"])
    first: list[np.ndarray | None] = []
    if size is None:  # the first image that decodes sets S
        for jpeg in images:
            first.append(_decode_or_none(jpeg, None))
            if first[-1] is not None:
                size = first[-1].shape[0]
                break
    draws = draw_augmentation(n, size or crop, crop, eigenvalues, eigenvectors, sigma, rng)
    out = np.empty((n, crop, crop, 3), np.uint8)
    patches, valid = torch.from_numpy(out), np.ones(n, dtype=bool)
    # each image decoded into the same buffer, its patch copied out before the next: a fresh array per image cost
    # 5% of a read task (micro-benchmark here)
    into = np.empty((size or crop, size or crop, 3), np.uint8)
    for i, im in enumerate(itertools.chain(first, (_decode_or_none(jpeg, size, into) for jpeg in images))):
        if im is None or im.shape != (size, size, 3):
            out[i], valid[i] = 0, False
            continue
        y, x = draws["offset"][i]
        if draws["flip"][i]:  # torch's flip kernel: numpy's reversed 3-byte pixels cost 7x a plain copy here
            patches[i] = torch.from_numpy(im[y:y + crop, x:x + crop]).flip(1)
        else:
            out[i] = im[y:y + crop, x:x + crop]
    return {"image": out, **draws, "label": np.asarray(batch["label"], np.int64), "valid": valid}


def patches_nchw(images: torch.Tensor) -> torch.Tensor:
    """train_batch's (N, c, c, 3) patches as the model's (N, 3, c, c), a view (channels-last strides)."""
    return images.permute(0, 3, 1, 2)


def train_draws(batch: dict, *, crop: int, eigenvalues: np.ndarray, eigenvectors: np.ndarray,
                sigma: float, size: int, rng: np.random.Generator | None = None) -> dict:
    """--decode gpu, in Ray Data's read tasks: the stored JPEG bytes untouched and the random draws; the worker
    decodes and crops on its GPU (`decode_on_device`, `crop_on_device`)."""
    draws = draw_augmentation(len(batch["image"]), size, crop, eigenvalues, eigenvectors, sigma, rng)
    return {"jpeg": batch["image"], **draws, "label": np.asarray(batch["label"], np.int64)}


def decode_on_device(jpegs, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored JPEG bytes -> ((N, 3, S, S) uint8, (N,) bool valid), decoded on `device` (nvJPEG for a whole batch
    in one call); an image that does not decode to S x S is zeros, marked invalid, as in decode_checked."""
    # here, not at the top: torchvision's import (1.5 s on a core here, torch._dynamo through torchvision.ops) is
    # paid by every fresh process that runs a read task, before the first batch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one damaged image fails the batch call: decode one by one to find it
        images = []
        for d in data:
            try:
                images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    valid = [im is not None and tuple(im.shape) == (3, size, size) for im in images]
    if all(valid):
        return torch.stack(images), torch.ones(len(images), dtype=torch.bool, device=device)
    out = torch.zeros((len(images), 3, size, size), dtype=torch.uint8, device=device)
    for i, ok in enumerate(valid):
        if ok:
            out[i] = images[i]
    return out, torch.tensor(valid, device=device)


def crop_on_device(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, crop: int) -> torch.Tensor:
    """(N, 3, S, S) -> (N, 3, crop, crop): each image's patch at its offset, mirrored where flips (one gather)."""
    steps = torch.arange(crop, device=images.device)
    rows = offsets[:, 0, None].long() + steps
    cols = offsets[:, 1, None].long() + steps
    cols = torch.where(flips[:, None].bool(), cols.flip(1), cols)
    n = torch.arange(len(images), device=images.device)[:, None, None]
    return images[n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def gpu_train_batch(batch: dict, size: int, crop: int, device: torch.device) -> dict:
    """A numpy batch of `train_draws` -> the tensors `train_batch` would have given, on `device`."""
    images, valid = decode_on_device(batch["jpeg"], size, device)
    offsets = torch.from_numpy(batch["offset"]).to(device, non_blocking=True)
    flips = torch.from_numpy(batch["flip"]).to(device, non_blocking=True)
    return {"image": crop_on_device(images, offsets, flips, crop), "offset": offsets, "flip": flips,
            "light": torch.from_numpy(batch["light"]).to(device, non_blocking=True),
            "label": torch.from_numpy(batch["label"]).to(device, non_blocking=True), "valid": valid}


def eval_batch(batch: dict, size: int | None = None) -> dict:
    """Ray Data map_batches: stored JPEGs -> whole (N, 3, S, S) uint8 images and `valid` (see decode_checked);
    crops are taken on device."""
    images, valid = decode_checked(batch["image"], size)
    out = {"image": images, "label": np.asarray(batch["label"], np.int64), "valid": valid}
    if "path" in batch:  # evaluation keeps each image's identity
        out["path"] = np.asarray(batch["path"])
    return out


def view_offsets(size: int, crop: int) -> dict[str, tuple[int, int]]:
    """(y, x) of the paper's five patch positions in a size x size image."""
    far, mid = size - crop, (size - crop) // 2
    return {"top_left": (0, 0), "top_right": (0, far), "bottom_left": (far, 0),
            "bottom_right": (far, far), "center": (mid, mid)}


def eval_views(size: int, crop: int, mode: str) -> list[tuple[int, int, bool]]:
    """(y, x, flip) of the views averaged at test time: 'center' -> 1, '10crop' -> 10."""
    offsets = view_offsets(size, crop)
    if mode == "center":
        return [(*offsets["center"], False)]
    if mode == "10crop":
        return [(*offsets[c], flip) for c in CORNERS for flip in (False, True)]
    raise ValueError(f"unknown eval view mode {mode!r}: 'center' or '10crop'")


class Normalizer:
    """Device side: (uint8 crop - mean image at the same place, flipped alike) + lighting, x scale.

    `mean_image` is the (S, S, 3) float32 array of `OUT/mean_image.npy`.
    """

    def __init__(self, mean_image: np.ndarray, device: torch.device, scale: float = 1.0,
                 channels_last: bool = False, reuse_output: bool = False):
        self.mean = torch.as_tensor(np.ascontiguousarray(mean_image.transpose(2, 0, 1)), device=device)
        self.mean_flipped = self.mean.flip(2).contiguous()
        self.size, self.device, self.scale, self.channels_last = mean_image.shape[0], device, scale, channels_last
        # On the CPU, a fresh 77 MB batch of floats is a fresh mapping whose pages the kernel zeroes on first
        # touch: 0.3 ms an image, more than the subtraction itself (measured here). A loop that is done with each
        # input before asking for the next (the training loop) can let the next one overwrite it.
        self.reuse_output, self._out = reuse_output, None

    def __call__(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                 light: torch.Tensor | None = None) -> torch.Tensor:
        """images (N, 3, c, c) uint8 (any strides) already cropped at offsets (N, 2) and flipped where flips (N,).
        The output is contiguous, or channels-last with `channels_last`, whatever the input's layout."""
        images = images.to(self.device, non_blocking=True)
        light = None if light is None else light.to(self.device, non_blocking=True)
        x = self._minus_mean(images, offsets, flips, light)
        if self.scale != 1.0:
            x.mul_(self.scale)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _minus_mean(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                    light: torch.Tensor | None = None) -> torch.Tensor:
        """images - the mean image at each one's offset and flip (+ its (N, 3) lighting), as float32.

        On a GPU one gather kernel.  On the CPU the gather is memory-bound (~4x slower than the
        rest of the step's input work), so there: one fused uint8 - float subtraction per image
        from a view of the mean image (or of its mirror image) into the output, and its lighting
        added while that image is still in the cache (a pass over the whole batch afterwards cost
        a fifth of the CPU's input work, measured here).
        """
        if self.device.type == "cpu":
            return self._minus_mean_sliced(images, offsets, flips, light)
        x = self._minus_mean_gathered(images, offsets, flips)
        return x if light is None else x.add_(light[:, :, None, None])

    def _minus_mean_gathered(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        crop = images.shape[-1]
        offsets, flips = offsets.to(self.device, non_blocking=True), flips.to(self.device, non_blocking=True)
        steps = torch.arange(crop, device=self.device)
        rows = offsets[:, 0, None] + steps
        cols = offsets[:, 1, None] + steps
        cols = torch.where(flips[:, None].bool(), cols.flip(1), cols)
        mean = self.mean[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)  # (N, 3, c, c)
        return images.float() - mean

    def _minus_mean_sliced(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                           light: torch.Tensor | None = None) -> torch.Tensor:
        crop = images.shape[-1]
        light = None if light is None else light[:, :, None, None]
        out = self._out
        if out is None or out.shape != images.shape:
            out = torch.empty(images.shape, dtype=torch.float32, device=self.device)
            self._out = out if self.reuse_output else None
        for i, ((y, x), flip) in enumerate(zip(offsets.tolist(), flips.tolist())):
            if flip:  # columns x+c-1 .. x of the mean = columns S-x-c .. S-x-1 of its mirror image
                mean = self.mean_flipped[:, y:y + crop, self.size - x - crop:self.size - x]
            else:
                mean = self.mean[:, y:y + crop, x:x + crop]
            torch.sub(images[i], mean, out=out[i])
            if light is not None:
                out[i].add_(light[i])
        return out

    def view(self, images: torch.Tensor, y: int, x: int, flip: bool, crop: int) -> torch.Tensor:
        """One eval view of whole (N, 3, S, S) uint8 images."""
        images = images.to(self.device, non_blocking=True)
        patch = images[:, :, y:y + crop, x:x + crop]
        if flip:
            patch = patch.flip(3)
        n = images.shape[0]
        offsets = torch.tensor([y, x], device=self.device).expand(n, 2)
        flips = torch.full((n,), flip, device=self.device)
        return self(patch, offsets, flips)
