"""The paper's SGD (learning rate inside the velocity) next to torch's SGD."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch


class PaperSGD(torch.optim.Optimizer):
    """v <- momentum*v - weight_decay*lr*w - lr*grad ;  w <- w + v   (section 5 of the paper).

    Equal to torch.optim.SGD while the learning rate is constant; after a drop the old
    velocity keeps its old step size here, whereas torch's rescales it by the new rate.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            # foreach kernels need one device and dtype per call: the two towers may sit on two GPUs
            buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[], [], []])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bucket = buckets[(p.device, p.dtype)]
                bucket[0].append(p), bucket[1].append(p.grad), bucket[2].append(state["velocity"])
            for params, grads, velocities in buckets.values():
                torch._foreach_mul_(velocities, mu)
                torch._foreach_add_(velocities, params, alpha=-wd * lr)
                torch._foreach_add_(velocities, grads, alpha=-lr)
                torch._foreach_add_(params, velocities)
        return loss


def build_optimizer(name: str, params: Iterable, lr: float, momentum: float, weight_decay: float):
    """'paper' -> PaperSGD; 'torch' -> torch.optim.SGD with the same hyperparameters."""
    if name == "paper":
        return PaperSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "torch":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose 'paper' or 'torch'")
