"""Search spaces as data: a training-config key mapped to a distribution.

    lr:           {loguniform: [0.002, 0.05]}
    weight_decay: {loguniform: [1.0e-4, 2.5e-3]}
    dropout:      {uniform: [0.3, 0.7]}
    batch_size:   {choice: [64, 128]}
    momentum:     {grid: [0.8, 0.9]}

Keys are `TrainConfig` fields (`lr`, `weight_decay`, ...; a `train.` prefix is accepted);
values are one of: uniform, loguniform, randint [low, high), choice [...], grid [...].
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from alexnet.config import TrainConfig, UsageError, load_yaml_mapping

# Centred on the paper's values (lr 0.01, weight decay 0.0005, dropout 0.5).
PAPER_SPACE: dict[str, dict] = {
    "lr": {"loguniform": [0.002, 0.05]},
    "weight_decay": {"loguniform": [1e-4, 2.5e-3]},
    "dropout": {"uniform": [0.3, 0.7]},
}
PAPER_GRID: dict[str, dict] = {
    "lr": {"grid": [0.005, 0.01, 0.02]},
    "weight_decay": {"grid": [2.5e-4, 5e-4, 1e-3]},
    "dropout": {"grid": [0.4, 0.5, 0.6]},
}
RANGES = ("uniform", "loguniform", "randint")
LISTS = ("choice", "grid")
# What a trial may not change: where data, runs and the cluster are, and the resources of a trial.
NOT_TUNABLE = {"data", "experiment", "run_name", "tracking_uri", "storage_path", "address", "check_resources",
               "resource_wait_s", "num_workers", "gpus_per_worker", "cpus_per_worker", "max_failures", "keep_checkpoints", "seeds",
               "init_from", "register_model"}


def tunable_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)} - NOT_TUNABLE


def load_space(path: Path | None, grid: bool = False) -> dict[str, dict]:
    """The YAML space at `path`, else the paper-centred default (random or grid); validated."""
    if path is None:
        return PAPER_GRID if grid else PAPER_SPACE
    return validate_space(load_yaml_mapping(path), source=str(path))


def validate_space(space: dict[str, Any], source: str = "search space") -> dict[str, dict]:
    """UsageError for an unknown key, an unknown distribution or malformed bounds."""
    out = {}
    for key, spec in space.items():
        name = key.removeprefix("train.").replace("-", "_")
        if name not in tunable_keys():
            raise UsageError(f"{source}: {key!r} is not a tunable training option "
                             f"(tunable: {', '.join(sorted(tunable_keys()))})")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise UsageError(f"{source}: {key} must map to one distribution, e.g. {{uniform: [0.3, 0.7]}}")
        (kind, args), = spec.items()
        if kind in RANGES:
            if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
                    and args[0] < args[1] and (kind != "loguniform" or args[0] > 0)):
                raise UsageError(f"{source}: {key}: {kind} needs [low, high] with low < high"
                                 f"{' and low > 0' if kind == 'loguniform' else ''}")
        elif kind in LISTS:
            if not (isinstance(args, list) and args):
                raise UsageError(f"{source}: {key}: {kind} needs a non-empty list")
        else:
            raise UsageError(f"{source}: {key}: unknown distribution {kind!r} (use {', '.join(RANGES + LISTS)})")
        out[name] = {kind: args}
    if not out:
        raise UsageError(f"{source}: the search space is empty")
    return out


def _probes(kind: str, args: list) -> list:
    """The values a distribution can produce at its edges (every value of a list)."""
    if kind in LISTS:
        return list(args)
    low, high = args
    if kind == "randint":  # [low, high)
        return [low, high - 1]
    return [low, high - (high - low) * 1e-9]  # uniform, loguniform: [low, high)


def check_space(space: dict[str, dict], base: TrainConfig, stored_size: int, source: str = "search space") -> None:
    """Before Ray starts: every edge and choice of `space`, set on the base config, passes the training config's
    own checks and fits the data (crops within the stored images); else a UsageError naming the key."""
    for key, spec in space.items():
        (kind, args), = spec.items()
        for value in _probes(kind, args):
            try:
                cfg = base.with_overrides({key: value})
            except (UsageError, ValueError, TypeError) as err:
                raise UsageError(f"{source}: {key}: {kind} {args} can give {value!r}, which training refuses: "
                                 f"{err}") from err
            if cfg.image_size > stored_size:
                raise UsageError(f"{source}: {key}: {kind} {args} can give image_size {cfg.image_size}, larger "
                                 f"than the stored images ({stored_size} px)")


def to_tune(space: dict[str, dict]) -> dict[str, Any]:
    """Ray Tune's param_space entries."""
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    out = {}
    for key, spec in space.items():
        (kind, args), = spec.items()
        out[key] = make[kind](*args) if kind in make else (tune.choice(args) if kind == "choice" else
                                                             tune.grid_search(args))
    return out


def contains(spec: dict, value: Any) -> bool:
    """Whether a sampled value lies in its declared distribution."""
    (kind, args), = spec.items()
    if kind in RANGES:
        return args[0] <= value <= args[1]
    return value in args
