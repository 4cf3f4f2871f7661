"""Checkpoints: `state.pt` written by rank 0 each epoch, read back to resume, to fine-tune (`--init-from`)
and to evaluate; a finished run's best checkpoint found from its MLflow run."""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import torch

from alexnet.config import Log, TrainConfig, UsageError
from alexnet.model import SHAPE_KEYS, build_model, output_layer

CHECKPOINT_FILE = "state.pt"


def training_state(model, optimizer, scheduler, epoch: int, best_top1_err: float, cfg: TrainConfig) -> dict:
    """What a checkpoint holds after `epoch` epochs: tensors and plain data only."""
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "best_top1_err": best_top1_err, "config": cfg.to_dict()}


def report_with_checkpoint(metrics: dict, state: dict) -> None:
    """ray.train.report with `state` saved as this epoch's checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def run_checkpoints(fs, run_dir: str) -> list[str]:
    """A run folder's checkpoint folders (on `fs`, a pyarrow filesystem), newest first (names carry the time)."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
    return sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                   and i.base_name.startswith("checkpoint_")), reverse=True)


def _read_on(fs, folder: str) -> dict:
    try:
        with fs.open_input_file(f"{folder}/{CHECKPOINT_FILE}") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - missing, truncated, or an object weights_only refuses
        raise UsageError(f"{type(err).__name__}: {str(err)[:200]}") from err


def newest_readable(fs, folders: list[str], log: Log = print) -> tuple[dict, str]:
    """The state of the first readable checkpoint of `folders` (newest first) and its folder. Damaged ones
    (a truncated state.pt, an interrupted upload) are named in a warning; none readable is a UsageError."""
    damaged = []
    for folder in folders:
        try:
            state = _read_on(fs, folder)
        except UsageError as err:
            damaged.append(f"{folder} ({err})")
            continue
        if damaged:
            log(f"WARNING: checkpoint(s) {'; '.join(damaged)} unreadable: resuming from {folder} "
                f"(epoch {state['epoch']}); the epochs after it run again")
        return state, folder
    raise UsageError("no readable checkpoint to resume from: " + "; ".join(damaged)
                     + ". Move the run folder away to start afresh, or restore a checkpoint")


def finished_metrics(storage: str, name: str, epochs: int) -> dict | None:
    """The last epoch's metrics of a run whose newest readable checkpoint holds all `epochs`, else None
    (a sweep trial resumed after it had finished reports them again instead of training nothing)."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(f"{storage}/{name}") if "://" in storage else (
        pyarrow.fs.LocalFileSystem(), f"{storage}/{name}")
    folders = run_checkpoints(fs, root)
    if not folders:
        return None
    state, _ = newest_readable(fs, folders, log=lambda _: None)
    if int(state["epoch"]) < epochs:
        return None
    return state.get("metrics") or {"epoch": int(state["epoch"]), "val/top1_err": float(state["best_top1_err"]),
                                    "val/top1_err_best": float(state["best_top1_err"])}


def check_resumable(storage: str, name: str, log: Log = print) -> None:
    """Before Ray starts: a rerun whose kept checkpoints are all unreadable is a UsageError naming them."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(f"{storage}/{name}")
    folders = run_checkpoints(fs, root)
    if folders:
        newest_readable(fs, folders, log)


def restore_training_state(model, optimizer, scheduler, checkpoint) -> tuple[int, float]:
    """(epochs done, best val error) with weights, optimizer (momentum) and scheduler state loaded from Ray
    Train's `checkpoint` (`ray.train.get_checkpoint()` after a restart or rerun); (0, inf) when it is None.

    A damaged latest checkpoint falls back to the newest readable one kept beside it."""
    if checkpoint is None:
        return 0, math.inf
    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    others = [f for f in run_checkpoints(fs, latest.rsplit("/", 1)[0]) if f.rstrip("/") != latest]
    state, _ = newest_readable(fs, [latest, *others])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), float(state["best_top1_err"])


def load_checkpoint_state(checkpoint) -> dict:
    with checkpoint.as_directory() as folder:
        return read_state(Path(folder))


def read_state(location: str | Path) -> dict:
    """A checkpoint's state (a folder holding state.pt, the file, or a URI such as s3://...): tensors and
    plain data only (weights_only: nothing is unpickled)."""
    if "://" in str(location):
        from ray.train import Checkpoint

        return load_checkpoint_state(Checkpoint(str(location)))
    path = Path(location)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UsageError(f"checkpoint {file} does not exist") from err
    except Exception as err:  # noqa: BLE001 - corrupt file, or an object weights_only refuses
        raise UsageError(f"checkpoint {file} is unreadable: {type(err).__name__}: {str(err)[:300]}") from err


def checkpoint_location(run) -> str:
    """A training run's best checkpoint (tag best_checkpoint, set when the run finished) as a path or URI."""
    path = run.data.tags.get("best_checkpoint")
    if not path:
        raise UsageError(f"MLflow run {run.info.run_id} ({run.data.tags.get('mlflow.runName')}) has no checkpoint: "
                         "is it a finished pipelines/train.py run?")
    storage = run.data.tags.get("ray_storage", "")
    if "://" in storage and "://" not in path:  # Ray gives remote checkpoint paths without their scheme
        return f"{storage.split('://')[0]}://{path}"
    return path


def resolve_init_from(cfg: TrainConfig) -> str | None:
    """--init-from as a checkpoint path: an existing path as given, else an MLflow run id."""
    if not cfg.init_from:
        return None
    if "://" in cfg.init_from:
        return cfg.init_from
    path = Path(cfg.init_from).expanduser()
    if path.exists():
        return str(path.resolve())
    if "/" in cfg.init_from or cfg.init_from.endswith(".pt"):
        raise UsageError(f"--init-from {cfg.init_from} does not exist")
    from alexnet.tracking import resolve_tracking_uri

    return checkpoint_of_run(resolve_tracking_uri(cfg.tracking_uri), cfg.init_from)


def checkpoint_of_run(uri: str, run_id: str) -> str:
    """The best checkpoint recorded by a finished training run, by MLflow run id."""
    from alexnet.tracking import Runs

    return checkpoint_location(Runs(uri).get(run_id))


def load_initial_weights(model, state: dict) -> list[str]:
    """Copy a checkpoint's weights into `model` (fine-tuning); returns the keys left at their init.

    Every tensor must match in name and shape except the output layer, which stays freshly
    initialised when the class count differs. Anything else (another arch, width, image size or
    sixth conv layer) is a UsageError naming the mismatch.
    """
    source = TrainConfig.from_dict(state["config"]) if "config" in state else None
    prefix, _ = output_layer(model)
    own, theirs = model.state_dict(), state["model"]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    wrong = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape)
    replaced = [k for k in wrong if k.startswith(prefix)]
    bad = missing + unexpected + [k for k in wrong if not k.startswith(prefix)]
    if bad:
        what = f" (it was trained with {', '.join(f'{k}={getattr(source, k)}' for k in SHAPE_KEYS)})" if source else ""
        raise UsageError(f"--init-from weights do not fit this model{what}: "
                         f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''} differ")
    model.load_state_dict({k: v for k, v in theirs.items() if k not in replaced}, strict=False)
    return replaced


def model_from_state(state: dict, num_classes: int, device: torch.device | str = "cpu"):
    """A model holding a checkpoint's weights on one device (both towers there), in eval mode."""
    model = build_model(TrainConfig.from_dict(state["config"]), num_classes, [device])
    model.load_state_dict(state["model"])
    return model.eval()
