"""The worker's epoch and evaluation functions, without Ray: CPU here, CUDA (towers split) where present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.augment import Normalizer
from alexnet.config import TrainConfig
from alexnet.model import build_model
from alexnet.optim import build_optimizer
from alexnet.loop import evaluate, train_epoch

SIZE, CROP, CLASSES = 72, 64, 3


def _batches(n_batches: int, batch: int, seed: int, whole: bool = False):
    """Class k = images brighter in channel k; as the Ray Data stages would hand them over."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        labels = rng.integers(0, CLASSES, batch)
        side = SIZE if whole else CROP
        images = rng.integers(0, 120, (batch, 3, side, side))
        images[np.arange(batch), labels] += 120
        b = {"image": torch.from_numpy(images.astype(np.uint8)), "label": torch.from_numpy(labels),
             "valid": torch.ones(batch, dtype=torch.bool)}
        if not whole:
            b |= {"offset": torch.from_numpy(rng.integers(0, SIZE - CROP + 1, (batch, 2)).astype(np.int32)),
                  "flip": torch.from_numpy(rng.random(batch) < 0.5), "light": torch.zeros(batch, 3)}
        out.append(b)
    return out


def _run(devices, amp=False, channels_last=False, compile=False):
    cfg = TrainConfig(data="unused", width=0.25, image_size=CROP, init="pytorch", amp=amp, channels_last=channels_last,
                      lr=0.005, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES, devices)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer("paper", model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    norm = Normalizer(np.full((SIZE, SIZE, 3), 60.0, np.float32), devices[0], channels_last=channels_last)
    before = evaluate(model, _batches(4, 16, 99, whole=True), norm, cfg, SIZE, "center", devices[0])
    net = torch.compile(model) if compile else model  # as the worker does with --compile
    stats = [train_epoch(net, opt, _batches(12, 16, seed), norm, cfg, devices[0]) for seed in range(4)]
    after = evaluate(model, _batches(4, 16, 99, whole=True), norm, cfg, SIZE, "10crop", devices[0])
    return before, stats, after


def test_an_epoch_sums_what_workers_add_up_and_the_net_learns_on_cpu():
    before, stats, after = _run([torch.device("cpu")])
    assert all(s["n"] == 12 * 16 for s in stats)
    assert 0 <= stats[-1]["correct"] <= stats[-1]["n"] and stats[-1]["waited"] >= 0
    assert stats[-1]["loss_sum"] / stats[-1]["n"] < stats[0]["loss_sum"] / stats[0]["n"]
    assert before["n"] == after["n"] == 64
    assert after["top1"] > before["top1"] and after["top1"] >= 0.8 * 64
    assert after["top5"] == 64  # 3 classes: the top 5 always holds the label


def test_damaged_images_change_nothing_but_their_count():
    """Rows marked invalid (a JPEG that does not decode, kept as zeros so every worker keeps its step count)
    neither move the weights nor enter the loss, hits or image counts: whatever their pixels and labels."""
    cfg = TrainConfig(data="unused", width=0.25, image_size=CROP, init="pytorch", lr=0.005, dropout=0.0)
    norm = Normalizer(np.full((SIZE, SIZE, 3), 60.0, np.float32), torch.device("cpu"))
    results = []
    for garbage in (0, 1):
        batches = _batches(3, 16, 7)
        for b in batches:
            b["valid"][[2, 5]] = False
            b["image"][[2, 5]] = 255 * garbage
            b["label"][[2, 5]] = garbage * 2
        torch.manual_seed(0)
        model = build_model(cfg, CLASSES, [torch.device("cpu")])
        opt = build_optimizer("paper", model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
        stats = train_epoch(model, opt, batches, norm, cfg, torch.device("cpu"))
        whole = _batches(2, 16, 9, whole=True)
        for b in whole:
            b["valid"][0] = False
            b["label"][0] = garbage
        results.append((stats, evaluate(model, whole, norm, cfg, SIZE, "center", torch.device("cpu")),
                        [p.detach().clone() for p in model.parameters()]))
    (s0, e0, w0), (s1, e1, w1) = results
    assert s0["n"] == 3 * 14 and s0["damaged"] == 6 and e0["n"] == 2 * 15 and e0["damaged"] == 2
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w0, w1))
    assert s0["loss_sum"] == pytest.approx(s1["loss_sum"]) and s0["correct"] == s1["correct"]
    assert {k: e0[k] for k in ("nll_sum", "top1", "top5")} == pytest.approx({k: e1[k] for k in ("nll_sum", "top1", "top5")})


@pytest.mark.gpu
@pytest.mark.parametrize("amp, channels_last, compile", [(False, False, False), (True, True, False), (True, True, True)])
def test_towers_on_two_cuda_devices_learn(amp, channels_last, compile):
    n = torch.cuda.device_count()
    devices = [torch.device("cuda", 0), torch.device("cuda", min(1, n - 1))]
    before, stats, after = _run(devices, amp, channels_last, compile)
    assert stats[-1]["loss_sum"] / stats[-1]["n"] < stats[0]["loss_sum"] / stats[0]["n"]
    assert after["top1"] >= 0.8 * 64


def test_input_until_crops_stops_at_the_uint8_crops_and_model_makes_the_models_float_input():
    from alexnet.loop import model_input

    rng = np.random.default_rng(3)
    mean = rng.uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    crops = torch.from_numpy(rng.integers(0, 256, (4, CROP, CROP, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    batch = {"image": crops, "offset": torch.zeros((4, 2), dtype=torch.int64), "flip": torch.zeros(4, dtype=torch.bool),
             "light": torch.full((4, 3), 2.0)}
    norm = Normalizer(mean, torch.device("cpu"))
    until_crops = TrainConfig(data="d", image_size=CROP, input_only=True, input_until="crops")
    as_crops = model_input(batch, norm, until_crops, torch.device("cpu"))
    assert as_crops.dtype == torch.uint8 and torch.equal(as_crops, crops)
    for cfg in (TrainConfig(data="d", image_size=CROP, input_only=True), TrainConfig(data="d", image_size=CROP)):
        as_model = model_input(batch, norm, cfg, torch.device("cpu"))
        expected = crops.float() - torch.from_numpy(mean[:CROP, :CROP].transpose(2, 0, 1)) + 2.0
        assert as_model.dtype == torch.float32 and torch.allclose(as_model, expected)
