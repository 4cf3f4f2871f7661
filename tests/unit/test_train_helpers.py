"""Driver-side helpers of alexnet.train that need no Ray."""

from __future__ import annotations

import math

import pytest

from alexnet.config import TrainConfig, UsageError
from alexnet.train import format_epoch, stall_message


def test_paper_init_stall_is_reported():
    message = stall_message([math.log(10)] * 3, 10)
    assert message and "--init pytorch" in message
    assert stall_message([math.log(10), 1.2, 1.0], 10) is None
    assert stall_message([math.log(10)] * 2, 10) is None


def test_epoch_line_has_the_figures():
    line = format_epoch({"epoch": 3, "train/loss": 1.2345, "train/top1_err": 0.5, "val/top1_err": 0.25,
                         "val/top5_err": 0.05, "lr": 0.01, "images_per_s": 1234.0, "data_wait_frac": 0.03,
                         "epoch_seconds": 2.5}, 90)
    assert line.startswith("epoch 3/90") and "val err 25.0%" in line and "data wait 3%" in line


@pytest.mark.parametrize("argv, message", [
    (["--arch", "owt", "--gpus-per-worker", "2"], "single column"),
    (["--batch-size", "100", "--num-workers", "3"], "multiple of --num-workers"),
    (["--dropout", "1.0"], "--dropout"),
])
def test_inconsistent_flags_are_refused(argv, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig.from_dict({"data": "x", **{a.lstrip("-").replace("-", "_"): _value(v)
                                               for a, v in zip(argv[::2], argv[1::2])}})


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_yaml_defaults_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nlr: 0.02\nwidth: 0.5\n")
    cfg = TrainConfig.parse_args(["--data", "d", "--config", str(tmp_path / "c.yaml"), "--lr", "0.05"])
    assert (cfg.epochs, cfg.lr, cfg.width) == (7, 0.05, 0.5)
