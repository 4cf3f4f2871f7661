"""The paper's augmentation: random crops, flips, PCA lighting, mean subtraction, and the 10 test views."""

from __future__ import annotations

import io
import numpy as np
import pytest
import torch

from alexnet.augment import (Normalizer, decode_checked, decode_image, eval_batch, eval_views, lighting, patches_nchw,
                             train_batch)
from alexnet.imaging import encode_jpeg

SIZE, CROP = 40, 32
# a plausible RGB PCA on the [0, 1] scale (columns are eigenvectors), as pca.json stores it
EIGVALS = np.array([0.06, 0.005, 0.001])
EIGVECS = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]


def _stored(n: int, seed: int = 0, chroma: str = "420") -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode_jpeg(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), 95, chroma) for _ in range(n)]


def test_train_batch_shapes_and_that_crops_are_flipped_patches_of_the_image():
    jpegs = _stored(64)
    out = train_batch({"image": np.array(jpegs, dtype=object), "label": np.arange(64)}, crop=CROP,
                      eigenvalues=EIGVALS, eigenvectors=EIGVECS, sigma=0.1)
    assert out["image"].shape == (64, CROP, CROP, 3) and out["image"].dtype == np.uint8  # channels-last
    assert out["light"].shape == (64, 3) and out["light"].dtype == np.float32
    assert out["label"].tolist() == list(range(64))
    assert 10 < out["flip"].sum() < 54  # about half flipped
    ys, xs = out["offset"].T
    assert ys.min() >= 0 and ys.max() <= SIZE - CROP and len(set(ys)) > 3
    for i in range(64):
        patch = decode_image(jpegs[i])[:, ys[i]:ys[i] + CROP, xs[i]:xs[i] + CROP]
        expected = patch[:, :, ::-1] if out["flip"][i] else patch
        np.testing.assert_array_equal(patches_nchw(torch.from_numpy(out["image"]))[i].numpy(), expected)


def test_crops_are_drawn_afresh_on_every_call():
    batch = {"image": np.array(_stored(16), dtype=object), "label": np.zeros(16)}
    a = train_batch(batch, crop=CROP, eigenvalues=EIGVALS, eigenvectors=EIGVECS, sigma=0.1)
    b = train_batch(batch, crop=CROP, eigenvalues=EIGVALS, eigenvectors=EIGVECS, sigma=0.1)
    assert not np.array_equal(a["offset"], b["offset"]) and not np.array_equal(a["light"], b["light"])


def test_pca_lighting_has_the_paper_covariance_on_the_0_255_scale():
    rng = np.random.default_rng(1)
    sigma = 0.1
    offsets = lighting(rng.normal(0, sigma, (200_000, 3)), EIGVALS, EIGVECS)
    # offset = P diag(alpha * lambda) -> cov = 255^2 sigma^2 P diag(lambda^2) P^T
    expected = 255.0**2 * sigma**2 * EIGVECS @ np.diag(EIGVALS**2) @ EIGVECS.T
    np.testing.assert_allclose(np.cov(offsets.T), expected, rtol=0.02, atol=1e-3)
    # on real photos the top eigenvalue is ~0.05 on [0, 1]: the shifts are ~1-2 grey levels, not ~0.005
    assert 0.5 < offsets.std(0).max() < 5.0


def test_no_lighting_when_sigma_is_zero():
    out = train_batch({"image": np.array(_stored(4), dtype=object), "label": np.zeros(4)}, crop=CROP,
                      eigenvalues=EIGVALS, eigenvectors=EIGVECS, sigma=0.0)
    assert not out["light"].any()


def test_normalizer_subtracts_the_mean_image_cropped_and_flipped_alike():
    rng = np.random.default_rng(2)
    mean = rng.uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    out = train_batch({"image": np.array(_stored(8, seed=3), dtype=object), "label": np.zeros(8)}, crop=CROP,
                      eigenvalues=EIGVALS, eigenvectors=EIGVECS, sigma=0.1)
    x = Normalizer(mean, torch.device("cpu"), scale=0.5)(
        patches_nchw(torch.from_numpy(out["image"])), torch.from_numpy(out["offset"]), torch.from_numpy(out["flip"]),
        torch.from_numpy(out["light"]))
    assert x.shape == (8, 3, CROP, CROP) and x.is_contiguous()  # the model's layout, whatever the patches' one
    for i in range(8):
        y0, x0 = out["offset"][i]
        m = mean[y0:y0 + CROP, x0:x0 + CROP].transpose(2, 0, 1)
        m = m[:, :, ::-1] if out["flip"][i] else m
        expected = (out["image"][i].transpose(2, 0, 1).astype(np.float32) - m + out["light"][i][:, None, None]) * 0.5
        np.testing.assert_allclose(x[i].numpy(), expected, atol=1e-4)


def test_both_mean_subtractions_agree_to_the_bit():
    """The GPU's single gather (lighting added to the whole batch after it) and the CPU's per-image slices of the
    mean and its mirror image (each image's lighting added right after its own subtraction)."""
    rng = np.random.default_rng(6)
    mean = rng.uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    images = torch.from_numpy(rng.integers(0, 256, (32, 3, CROP, CROP), dtype=np.uint8))
    offsets = torch.from_numpy(rng.integers(0, SIZE - CROP + 1, (32, 2)))
    offsets[:4] = torch.tensor([[0, 0], [0, SIZE - CROP], [SIZE - CROP, 0], [SIZE - CROP, SIZE - CROP]])
    flips = torch.from_numpy(rng.random(32) < 0.5)
    light = torch.from_numpy(rng.normal(0, 10, (32, 3)).astype(np.float32))
    norm = Normalizer(mean, torch.device("cpu"))
    channels_last = images.contiguous(memory_format=torch.channels_last)  # train_batch's patches, as the worker sees them
    for layout in (images, channels_last):
        gathered = norm._minus_mean_gathered(layout, offsets, flips)
        assert torch.equal(gathered, norm._minus_mean_sliced(layout, offsets, flips))
        assert torch.equal(norm(layout, offsets, flips), norm._minus_mean_sliced(images, offsets, flips))
        lit = norm._minus_mean_sliced(layout, offsets, flips, light)
        assert torch.equal(gathered + light[:, :, None, None], lit) and not torch.equal(gathered, lit)
        assert torch.equal(norm(layout, offsets, flips, light), lit)


def test_stored_images_decode_to_the_same_pixels_as_pillow_and_torchvision():
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    for jpeg in _stored(4, seed=7):
        ours = decode_image(jpeg)
        np.testing.assert_array_equal(ours, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).transpose(2, 0, 1))
        theirs = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        np.testing.assert_array_equal(ours, theirs.numpy())  # nvJPEG (--decode gpu) is checked against these


def test_a_jpeg_corrupt_inside_is_invalid_not_grey_blocks():
    """torchvision decodes a JPEG with zeroed bytes in its middle to an image (libjpeg-turbo's warning only);
    the decoder here refuses it, so training and evaluation skip it and count it."""
    jpeg = _stored(1, seed=5)[0]
    third = len(jpeg) // 3
    broken = jpeg[:third] + bytes(third) + jpeg[2 * third:]
    images, valid = decode_checked([jpeg, broken, jpeg[: len(jpeg) // 2], b"not a jpeg"])
    assert valid.tolist() == [True, False, False, False] and not images[1:].any()


def test_ten_views_are_four_corners_and_centre_each_flipped():
    views = eval_views(256, 224, "10crop")
    assert len(views) == 10 and len(set(views)) == 10
    assert {(y, x) for y, x, _ in views} == {(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)}
    assert sum(flip for *_, flip in views) == 5
    assert eval_views(256, 224, "center") == [(16, 16, False)]
    with pytest.raises(ValueError):
        eval_views(256, 224, "5crop")


def test_eval_view_equals_cropping_by_hand():
    rng = np.random.default_rng(4)
    mean = rng.uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    batch = eval_batch({"image": np.array(_stored(3, seed=5), dtype=object), "label": np.array([1, 2, 3])})
    assert batch["image"].shape == (3, 3, SIZE, SIZE)
    norm = Normalizer(mean, torch.device("cpu"))
    for y, x, flip in eval_views(SIZE, CROP, "10crop"):
        got = norm.view(torch.from_numpy(batch["image"]), y, x, flip, CROP).numpy()
        ref = batch["image"][:, :, y:y + CROP, x:x + CROP].astype(np.float32) - \
            mean[y:y + CROP, x:x + CROP].transpose(2, 0, 1)
        np.testing.assert_allclose(got, ref[..., ::-1] if flip else ref, atol=1e-4)


@pytest.mark.parametrize("first_damaged", [False, True])
def test_a_damaged_stored_image_is_marked_invalid_and_the_rest_decode_as_always(first_damaged):
    good = _stored(3, seed=8)
    larger, smaller = (encode_jpeg(np.zeros((SIZE + d, SIZE, 3), np.uint8), 95) for d in (8, -8))
    damaged = [good[0][: len(good[0]) // 3], b"not a jpeg", larger, smaller]
    jpegs = (damaged + good) if first_damaged else (good + damaged)
    batch = {"image": np.array(jpegs, dtype=object), "label": np.arange(7)}
    ev = eval_batch(batch, size=SIZE)
    tr = train_batch(batch, crop=CROP, eigenvalues=EIGVALS, eigenvectors=EIGVECS, sigma=0.1, size=SIZE)
    bad = np.array([True] * 4 + [False] * 3) if first_damaged else np.array([False] * 3 + [True] * 4)
    for out in (ev, tr):
        np.testing.assert_array_equal(out["valid"], ~bad)
        assert len(out["image"]) == len(out["label"]) == 7  # the batch keeps its rows
        assert not out["image"][bad].any()
    np.testing.assert_array_equal(ev["image"][~bad], np.stack([decode_image(b) for b in good]))
    np.testing.assert_array_equal(patches_nchw(torch.from_numpy(tr["image"][~bad])).numpy(),
                                  _cpu_crops(good, {"offset": tr["offset"][~bad], "flip": tr["flip"][~bad]}))


def _gpu_path_batch(jpegs: list[bytes]) -> dict:
    from alexnet.augment import train_draws

    return train_draws({"image": np.array(jpegs, dtype=object), "label": np.arange(len(jpegs))}, crop=CROP,
                       eigenvalues=EIGVALS, eigenvectors=EIGVECS, sigma=0.1, size=SIZE)


def _cpu_crops(jpegs: list[bytes], batch: dict) -> np.ndarray:
    """What train_batch cuts, for the same draws: the reference of the device path."""
    images = np.stack([decode_image(b) for b in jpegs])
    out = []
    for image, (y, x), flip in zip(images, batch["offset"], batch["flip"]):
        patch = image[:, y:y + CROP, x:x + CROP]
        out.append(patch[:, :, ::-1] if flip else patch)
    return np.stack(out)


def test_the_device_decode_path_cuts_what_the_cpu_path_cuts():
    """--decode gpu's worker side, run on the CPU device: same crops, flips and damaged-image marks."""
    from alexnet.augment import gpu_train_batch

    jpegs = _stored(6, seed=12)
    batch = _gpu_path_batch(jpegs)
    assert "image" not in batch
    batch["flip"] = np.array([True, False] * 3)  # both kinds, whatever the draw
    out = gpu_train_batch(batch, SIZE, CROP, torch.device("cpu"))
    np.testing.assert_array_equal(out["image"].numpy(), _cpu_crops(jpegs, batch))
    assert out["valid"].all() and out["light"].shape == (6, 3)
    damaged = gpu_train_batch(_gpu_path_batch([jpegs[0], b"broken", jpegs[1][:40]]), SIZE, CROP, torch.device("cpu"))
    assert damaged["valid"].tolist() == [True, False, False] and not damaged["image"][1:].any()


@pytest.mark.gpu
def test_gpu_decoding_of_444_jpegs_gives_the_cpu_pixels_within_one_grey_level():
    """What preprocess.py --chroma 444 stores. (4:2:0 chroma is upsampled differently by nvJPEG: measured on an
    H200 with bench/gpu_decode_check.py, 12% of the pixels of stored images off by more than 1, up to 56.)"""
    from alexnet.augment import gpu_train_batch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    jpegs = _stored(16, seed=13, chroma="444")
    batch = _gpu_path_batch(jpegs)
    out = gpu_train_batch(batch, SIZE, CROP, torch.device("cuda"))
    diff = np.abs(out["image"].cpu().numpy().astype(int) - _cpu_crops(jpegs, batch).astype(int))
    assert diff.max() <= 1, diff.max()
    damaged = gpu_train_batch(_gpu_path_batch([jpegs[0], b"broken"]), SIZE, CROP, torch.device("cuda"))
    assert damaged["valid"].tolist() == [True, False]


def test_444_jpegs_keep_full_colour_resolution_and_decode_on_the_cpu_path():
    from PIL import Image
    from PIL.JpegImagePlugin import get_sampling

    for chroma, sampling in (("420", 2), ("444", 0)):
        (jpeg,) = _stored(1, seed=14, chroma=chroma)
        assert get_sampling(Image.open(io.BytesIO(jpeg))) == sampling
        assert decode_image(jpeg).shape == (3, SIZE, SIZE)


def test_a_reusing_normalizer_writes_each_batch_into_the_same_floats():
    rng = np.random.default_rng(9)
    mean = rng.uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    batches = [torch.from_numpy(rng.integers(0, 256, (4, 3, CROP, CROP), dtype=np.uint8)) for _ in range(2)]
    offsets, flips = torch.zeros((4, 2), dtype=torch.int64), torch.tensor([False, True, False, True])
    fresh, reusing = Normalizer(mean, torch.device("cpu")), Normalizer(mean, torch.device("cpu"), reuse_output=True)
    first, second = (reusing(b, offsets, flips).clone() for b in batches)
    assert reusing(batches[0], offsets, flips).data_ptr() == reusing(batches[1], offsets, flips).data_ptr()
    assert torch.equal(first, fresh(batches[0], offsets, flips)) and torch.equal(second, fresh(batches[1], offsets, flips))
