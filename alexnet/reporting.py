"""A training run in MLflow and on the console: the run found again on a rerun, one line and one metric
batch per epoch (from Ray Train's controller), and the final model, kernel picture and learning curves."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ray.train import UserCallback

from alexnet.config import Log, TrainConfig, UsageError
from alexnet.loop import epoch_metrics
from alexnet.model import SHAPE_KEYS
from alexnet.outbox import Outbox
from alexnet.prepared import Prepared, classes_digest
from alexnet.tracking import Runs, logged_model_name


def open_training_run(runs: Runs, cfg: TrainConfig, name: str, storage: str, prepared: Prepared, log: Log,
                      tags: dict[str, str]) -> tuple[str, bool]:
    """(run id, resumed): the MLflow run of this Ray Train run, found again by name and storage on a rerun."""
    exp_id = runs.experiment_id(cfg.experiment)
    found = runs.find(exp_id, {"ray_run_name": name, "ray_storage": storage})
    config = cfg.to_dict()
    if found is None:
        tags = {"stage": "input-only" if cfg.input_only else "train", "ray_run_name": name, "ray_storage": storage, "mlflow.runName": name,
                "data.path": str(prepared.path), "data.size": str(prepared.size),
                "data.train_rows": str(prepared.summary["rows_written"]["train"]),
                "data.val_rows": str(prepared.val_rows),
                "data.preprocess_run_id": str(prepared.summary.get("mlflow_run_id")),
                "data.classes": classes_digest(prepared.wnids), **tags}
        params = config | {"num_classes": prepared.num_classes, "batch_size_per_worker": cfg.batch_size // cfg.num_workers}
        return runs.create(exp_id, name, tags=tags, params=params), False
    old = found.data.params
    changed = [k for k in SHAPE_KEYS if k in old and old[k] != str(config[k])]
    if changed:
        raise UsageError(f"run {name!r} was trained with other {', '.join(changed)} "
                         f"({', '.join(f'{k}={old[k]}' for k in changed)}): pick a new --run-name")
    run_id = found.info.run_id
    runs.resume(run_id)
    differ = {k: v for k, v in config.items() if k in old and old[k] != str(v)}
    runs.set_tags(run_id, tags | ({"resumed_with": json.dumps(differ, default=str)} if differ else {}))
    log(f"resuming run {name!r} (MLflow run {run_id})")
    return run_id, True


def format_epoch(m: dict, epochs: int | None = None) -> str:
    """One console line per epoch."""
    parts = [f"epoch {m['epoch']}{f'/{epochs}' if epochs else ''}"]
    if "train/loss" in m:
        parts.append(f"train loss {m['train/loss']:.3f} err {100 * m['train/top1_err']:.1f}%")
    else:
        parts.append(f"input only: {m['train/images']:,.0f} images")
    if "val/top1_err" in m:
        parts.append(f"val err {100 * m['val/top1_err']:.1f}% top5 {100 * m['val/top5_err']:.1f}%")
    if "val/top1_err_10crop" in m:
        parts.append(f"10crop {100 * m['val/top1_err_10crop']:.1f}%")
    if "train/lr" in m:
        parts.append(f"lr {m['train/lr']:.3g}")
    parts += [f"{m['images_per_s']:,.0f} img/s", f"data wait {100 * m['data_wait_frac']:.0f}%",
              f"first batch {m.get('first_batch_s', 0):.1f}s", f"{m['epoch_seconds']:.1f}s"]
    return "  ".join(parts)


def stall_message(losses: list[float], num_classes: int, epochs: int = 3) -> str | None:
    """The known paper-init stall: the loss sits at ln(num_classes) epoch after epoch."""
    chance = math.log(num_classes)
    if len(losses) >= epochs and all(abs(x - chance) < 0.02 * chance for x in losses[-epochs:]):
        return (f"WARNING: train/loss has stayed at ln({num_classes}) = {chance:.3f} for {len(losses)} epochs: "
                "the net is not learning. Narrow nets with the paper's N(0, 0.01) init stall like this; "
                "use --init pytorch (or a smaller --bias-value / larger --lr).")
    return None


class TrainingReporter(UserCallback):
    """Runs in the Ray Train controller (on the driver's node): per-epoch metrics to MLflow (through the run's
    outbox: a tracking store that is away never stops training) and the console."""

    def __init__(self, outbox: Outbox, num_classes: int, epochs: int, relay=None):
        self.outbox, self.num_classes, self.epochs = outbox, num_classes, epochs
        self.relay = relay  # alexnet.console.Relay: the lines reach the driver
        self.losses: list[float] = []
        self.warned = False

    def say(self, line: str) -> None:
        if self.relay is not None:
            self.relay.say(line)
        else:
            print(line, flush=True)

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]  # rank 0; the figures are already summed over all workers
        self.say(format_epoch(m, self.epochs))
        self.outbox.write({"op": "metrics", "step": int(m["epoch"]), "metrics": epoch_metrics(m),
                           "ms": int(time.time() * 1000)})
        damaged = {k: int(m[k]) for k in ("train/damaged_images", "val/damaged_images") if m.get(k)}
        if damaged:
            warning = (f"epoch {m['epoch']}: stored images that do not decode were skipped ("
                       + ", ".join(f"{k} {v}" for k, v in damaged.items()) + "): the shards are damaged; run "
                       "pipelines/preprocess.py again on the input to rewrite them")
            self.say(f"WARNING: {warning}")
            self.outbox.write({"op": "tags", "tags": {"warning_damaged_images": warning}})
        if "train/loss" not in m:  # --input-only
            return
        self.losses.append(float(m["train/loss"]))
        message = stall_message(self.losses, self.num_classes)
        if message and not self.warned:
            self.warned = True
            self.say(message)
            self.outbox.write({"op": "tags", "tags": {"warning": message}})


def log_final_artifacts(runs: Runs, run_id: str, state: dict, num_classes: int, name: str,
                        register_as: str | None = None) -> tuple[str, str | None]:
    """The model of the checkpoint `state` (any batch size; with that epoch's metrics; registered as `register_as`
    when given), the conv1 kernel picture and the learning curves: (model URI, registered version)."""
    from alexnet.checkpoints import model_from_state
    from alexnet.visualize import save_kernel_png

    model = model_from_state(state, num_classes)
    size = model.cfg.image_size
    # batch 2: a batch of 1 would be exported as a fixed dimension (see mlflow.pytorch.save_model)
    example = np.random.default_rng(0).normal(0.0, 50.0, (2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    epoch = int(state["epoch"])
    params = {k: state["config"][k] for k in SHAPE_KEYS if k in state["config"]} | {"num_classes": num_classes}
    tags = {"epoch": str(epoch), "selected_by": "val/top1_err"}
    model_uri, version = runs.log_model(run_id, model, example, logits, name=logged_model_name(name, f"epoch{epoch}"),
                                        step=epoch, params=params, tags=tags, register_as=register_as)
    with tempfile.TemporaryDirectory() as tmp:
        save_kernel_png(model, Path(tmp) / "conv1_kernels.png")
        learning_curves_png(runs, run_id, Path(tmp) / "learning_curves.png")
        runs.log_artifacts(run_id, tmp, artifact_path="train")
    return model_uri, version


def learning_curves_png(runs: Runs, run_id: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys in ((ax_loss, ("train/loss", "val/loss")),
                     (ax_err, ("train/top1_err", "val/top1_err", "val/top5_err", "val/top1_err_10crop"))):
        for key in keys:
            history = runs.metric_history(run_id, key)
            if history:
                ax.plot(*zip(*history), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_loss.set_title("loss")
    ax_err.set_title("error")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
