"""The training run's console lines (alexnet.reporting), without Ray."""

from __future__ import annotations

import math

from alexnet.reporting import format_epoch, stall_message


def test_paper_init_stall_is_reported():
    message = stall_message([math.log(10)] * 3, 10)
    assert message and "--init pytorch" in message
    assert stall_message([math.log(10), 1.2, 1.0], 10) is None
    assert stall_message([math.log(10)] * 2, 10) is None


def test_epoch_line_has_the_figures():
    line = format_epoch({"epoch": 3, "train/loss": 1.2345, "train/top1_err": 0.5, "val/top1_err": 0.25,
                         "val/top5_err": 0.05, "train/lr": 0.01, "images_per_s": 1234.0, "data_wait_frac": 0.03,
                         "epoch_seconds": 2.5}, 90)
    assert line.startswith("epoch 3/90") and "val err 25.0%" in line and "data wait 3%" in line and "lr 0.01" in line

