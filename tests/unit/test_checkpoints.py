"""Checkpoints are read as tensors and plain data only: a checkpoint that carries code never runs it."""

from __future__ import annotations

import os

import pytest
import torch

from alexnet.checkpoints import read_state
from alexnet.config import UsageError


class _Payload:
    """Unpickling this runs os.system: what a tampered state.pt on shared storage could carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("as_folder", [True, False])
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path, as_folder):
    marker = tmp_path / "pwned"
    (tmp_path / "ckpt").mkdir()
    state = tmp_path / "ckpt" / "state.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3, "extra": _Payload(str(marker))}, state)
    with pytest.raises(UsageError, match="is unreadable"):
        read_state(state.parent if as_folder else state)
    assert not marker.exists()
    # the same file unpickled without weights_only does run it: the test's payload is real
    torch.load(state, weights_only=False)
    assert marker.exists()


def test_a_plain_checkpoint_reads_back(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3, "best_top1_err": 0.5}, tmp_path / "state.pt")
    state = read_state(tmp_path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
