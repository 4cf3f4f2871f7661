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


@pytest.mark.parametrize("optimizer", ["paper", "torch"])
def test_a_restart_restores_momentum_and_the_schedule_exactly_as_saved(tmp_path, optimizer):
    """The next step after a restore equals the unbroken run's next step: weights, every momentum buffer and
    the plateau schedule (its best, bad-epoch count and the dropped learning rate) all came back."""
    from ray.train import Checkpoint

    from alexnet.checkpoints import CHECKPOINT_FILE, restore_training_state, training_state
    from alexnet.config import TrainConfig
    from alexnet.optim import build_optimizer

    def make():
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        opt = build_optimizer(optimizer, net.parameters(), 0.1, 0.9, 5e-4)
        return net, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=1)

    def step(net, opt, seed):
        g = torch.Generator().manual_seed(seed)
        loss = torch.nn.functional.cross_entropy(net(torch.randn(8, 6, generator=g)),
                                                 torch.randint(0, 3, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    net, opt, sched = make()
    for epoch, err in enumerate([0.5, 0.4, 0.45, 0.46]):  # no gain for 2 epochs: the rate drops to 0.01
        step(net, opt, epoch)
        sched.step(err)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    (tmp_path / "c").mkdir()
    torch.save(training_state(net, opt, sched, 4, 0.4, TrainConfig(data=tmp_path)), tmp_path / "c" / CHECKPOINT_FILE)

    torch.manual_seed(1)  # other initial weights: a restore that forgot them would show
    net2, opt2, sched2 = make()
    assert restore_training_state(net2, opt2, sched2, Checkpoint.from_directory(tmp_path / "c")) == (4, 0.4)
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    buffers = [opt.state[p] for p in net.parameters()]
    buffers2 = [opt2.state[p] for p in net2.parameters()]
    assert all(s and s.keys() == s2.keys() and all(torch.equal(s[k], s2[k]) for k in s)
               for s, s2 in zip(buffers, buffers2))
    step(net, opt, 99)
    step(net2, opt2, 99)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    assert restore_training_state(net2, opt2, sched2, None) == (0, float("inf"))


def test_a_finished_runs_last_metrics_come_back_from_its_newest_checkpoint(tmp_path):
    """What a sweep trial resumed after its last epoch reports (Ray Train itself would report nothing)."""
    from alexnet.checkpoints import finished_metrics

    run = tmp_path / "sweep-t1"
    for epoch in (2, 3):
        (run / f"checkpoint_2026-11-28_0{epoch}").mkdir(parents=True)
        torch.save({"epoch": epoch, "best_top1_err": 0.5, "metrics": {"epoch": epoch, "val/top1_err": 0.1 * epoch}},
                   run / f"checkpoint_2026-11-28_0{epoch}" / "state.pt")
    assert finished_metrics(str(tmp_path), "sweep-t1", 3) == {"epoch": 3, "val/top1_err": pytest.approx(0.3)}
    assert finished_metrics(str(tmp_path), "sweep-t1", 4) is None  # more epochs to train
    assert finished_metrics(str(tmp_path), "never-ran", 3) is None
