"""The paper's training run on Ray Train (V2), logged to MLflow from the driver side.

Driver: checks (data, sizes, tracking server, cluster resources) -> Ray Data pipelines over the
Parquet shards -> `TorchTrainer` -> model, kernel picture and learning curves to MLflow.
Workers: `train_loop_per_worker` -- two towers over the worker's devices, DDP across workers,
a checkpoint every epoch, resumed from `ray.train.get_checkpoint()` after a restart.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from alexnet.augment import Normalizer, eval_batch, eval_views, train_batch
from alexnet.config import TrainConfig, UsageError
from alexnet.model import MIN_IMAGE_SIZE, build_model
from alexnet.optim import build_optimizer
from alexnet.preprocess import ROW_GROUP_BYTES

Log = Callable[[str], None]
CHECKPOINT_FILE = "state.pt"
DECODE_BATCH = 32  # rows per Ray Data decoding task call
# Per-epoch metrics, as reported by the workers and logged to MLflow.
METRICS = ("train/loss", "train/top1_err", "val/loss", "val/top1_err", "val/top5_err", "val/top1_err_10crop",
           "val/top5_err_10crop", "val/images", "best_val_top1_err", "lr", "images_per_s", "data_wait_frac",
           "epoch_seconds")


# ---------------------------------------------------------------- the preprocessing output


@dataclass(frozen=True)
class Prepared:
    """What training needs from `pipelines/preprocess.py --output OUT`."""

    path: Path
    size: int
    wnids: list[str]
    mean_image: np.ndarray          # (S, S, 3) float32, 0-255
    eigenvalues: np.ndarray         # (3,), pixels on [0, 1]
    eigenvectors: np.ndarray        # (3, 3), columns
    train_files: list[str]
    val_files: list[str]
    summary: dict

    @property
    def num_classes(self) -> int:
        return len(self.wnids)


def read_prepared(path: Path) -> Prepared:
    """UsageError with the reason when `path` is not a finished preprocessing output with statistics."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise UsageError(f"--data {path} does not exist")
    if not (path / "summary.json").is_file():
        if (path / "_work").is_dir():
            raise UsageError(f"--data {path} is an unfinished preprocessing output: rerun pipelines/preprocess.py "
                             "with the same arguments to complete it")
        raise UsageError(f"--data {path} is not a preprocessing output (no summary.json)")
    summary = json.loads((path / "summary.json").read_text())
    for name in ("mean_image.npy", "pca.json", "classes.json"):
        if not (path / name).is_file():
            raise UsageError(f"--data {path} lacks {name}: preprocess without --no-stats")
    pca = json.loads((path / "pca.json").read_text())
    train_files = sorted(str(p) for p in (path / "train").glob("*.parquet"))
    if not train_files:
        raise UsageError(f"--data {path} holds no training shards")
    return Prepared(
        path=path, size=int(summary["config"]["size"]),
        wnids=[c["wnid"] for c in json.loads((path / "classes.json").read_text())["classes"]],
        mean_image=np.load(path / "mean_image.npy").astype(np.float32),
        eigenvalues=np.asarray(pca["eigenvalues"], np.float64),
        eigenvectors=np.asarray(pca["eigenvectors"], np.float64),
        train_files=train_files,
        val_files=sorted(str(p) for p in (path / "val").glob("*.parquet")
                         if summary["rows_written"].get("val", 0) > 0),
        summary=summary,
    )


def check_image_size(cfg: TrainConfig, prepared: Prepared) -> None:
    if cfg.image_size > prepared.size:
        raise UsageError(f"--image-size {cfg.image_size} is larger than the stored images ({prepared.size} px in "
                         f"{prepared.path}); crop at most {prepared.size} or preprocess with a larger --size")
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise UsageError(f"--image-size {cfg.image_size} is too small: AlexNet needs at least {MIN_IMAGE_SIZE}")


def build_datasets(cfg: TrainConfig, prepared: Prepared) -> dict:
    """Lazy Ray Data pipelines: re-executed every epoch, so the random crops, flips and lighting are new each time."""
    import ray

    sigma = cfg.lighting_sigma if cfg.pca_lighting else 0.0
    # File order reshuffled every epoch (streaming; a block-level shuffle would wait for the whole read),
    # rows mixed further in each worker's local shuffle buffer.
    train = (read_shards(prepared.train_files, ["image", "label"], shuffle="files")
             .map_batches(train_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                          fn_kwargs=dict(crop=cfg.image_size, eigenvalues=prepared.eigenvalues,
                                         eigenvectors=prepared.eigenvectors, sigma=sigma)))
    datasets = {"train": train}
    if prepared.val_files:
        datasets["val"] = (read_shards(prepared.val_files, ["image", "label"])
                           .map_batches(eval_batch, batch_size=DECODE_BATCH, batch_format="numpy"))
    return datasets


def read_shards(files: list[str], columns: list[str], shuffle: str | None = None):
    """Ray Data over preprocessing shards, in blocks of one row group.

    Ray's default 128 MiB blocks would read a whole shard as one block: one task decodes it,
    and a training pass's first batch waits for ~1000 images instead of ~100.
    """
    import ray

    ds = ray.data.read_parquet(files, shuffle=shuffle).select_columns(columns)
    ds.context.target_max_block_size = ROW_GROUP_BYTES
    return ds


def data_config():
    """Train is split in equal parts (DDP steps in lockstep); val in unequal parts, so no image is dropped."""
    from ray.train import DataConfig

    class _ValSplitUnequally(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            val = datasets.get("val")
            rest = {k: v for k, v in datasets.items() if k != "val"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if val is not None:
                val = val.copy(val)
                val.set_name("val")
                val.context.execution_options = self._resolve_execution_options("val")
                for i, split in enumerate(val.streaming_split(world_size, equal=False)):
                    output[i]["val"] = split
            return output

    return _ValSplitUnequally()


# ---------------------------------------------------------------- inside a worker


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sums across workers (gloo takes CPU tensors, NCCL CUDA ones); identity with one worker."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return t.cpu().tolist()


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp)


def train_epoch(net, optimizer, batches, normalizer: Normalizer, cfg: TrainConfig, device: torch.device) -> dict:
    """One pass over this worker's shard; sums (not means) so that workers can be added up."""
    net.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
    waited, start = 0.0, time.perf_counter()
    ready = time.perf_counter()
    for batch in batches:
        waited += time.perf_counter() - ready
        x = normalizer(batch["image"], batch["offset"], batch["flip"], batch["light"] if cfg.pca_lighting else None)
        y = batch["label"].to(device, non_blocking=True)
        with _autocast(cfg, device):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            totals += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                   torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
        ready = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loss_sum, correct, n = totals.tolist()
    return {"loss_sum": loss_sum, "correct": correct, "n": n, "waited": waited,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def view_probs(model, images: torch.Tensor, normalizer: Normalizer, cfg: TrainConfig, size: int, mode: str,
               device: torch.device) -> torch.Tensor:
    """Softmax averaged over the test views ('center', or the paper's '10crop') of whole stored images."""
    probs = 0
    views = eval_views(size, cfg.image_size, mode)
    for top, left, flip in views:
        with _autocast(cfg, device):
            logits = model(normalizer.view(images, top, left, flip, cfg.image_size))
        probs = probs + logits.float().softmax(1)
    return probs / len(views)


def evaluate(model, batches, normalizer: Normalizer, cfg: TrainConfig, size: int, mode: str,
             device: torch.device) -> dict:
    """Sums of loss, top-1 and top-5 hits over `batches`, softmax averaged over the views of `mode`."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nll sum, top1, top5, images
    for batch in batches:
        y = batch["label"].to(device, non_blocking=True)
        probs = view_probs(model, batch["image"], normalizer, cfg, size, mode, device)
        k = min(5, probs.shape[1])
        topk = probs.topk(k, 1).indices
        hits = topk == y[:, None]
        nll = -probs.gather(1, y[:, None]).clamp_min(1e-12).log().sum()
        totals += torch.stack([nll.double(), hits[:, 0].sum().double(), hits.any(1).sum().double(),
                               torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    return dict(zip(("nll_sum", "top1", "top5", "n"), totals.tolist()))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Dropout masks: a function of (seed, epoch, rank), so a resumed run draws what an unbroken one would."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


def _load_checkpoint(model, optimizer, scheduler) -> tuple[int, float]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, math.inf
    state = load_checkpoint_state(checkpoint)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), float(state["best_top1_err"])


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: config = {"cfg": TrainConfig dict, "num_classes", "size", "mean_image", "has_val"}."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    cfg = TrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    devices = list(ray.train.torch.get_devices()) if cfg.gpus_per_worker else [torch.device("cpu")]
    device = devices[0]  # input, output layer and loss live on the first device
    torch.manual_seed(cfg.seed)
    model = build_model(num_classes=config["num_classes"], devices=devices, **cfg.model_options())
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if world > 1:
        # One CUDA device: the usual DDP; a module spread over two devices (or CPU): device_ids=None.
        single_gpu = len(devices) == 1 and device.type == "cuda"
        net = DistributedDataParallel(model, device_ids=[device] if single_gpu else None)
    if cfg.compile:
        net = torch.compile(net)  # training steps only; evaluation and checkpoints use `model` itself
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=cfg.lr_patience, min_lr=cfg.lr * 0.1 ** cfg.max_lr_drops)
    start_epoch, best = _load_checkpoint(model, optimizer, scheduler)
    if start_epoch == 0 and config.get("init_from"):
        load_initial_weights(model, read_state(config["init_from"]))
    normalizer = Normalizer(config["mean_image"], device, cfg.pixel_scale, cfg.channels_last)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    per_worker = cfg.batch_size // world

    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, rank))
        lr = optimizer.param_groups[0]["lr"]
        batches = train_shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device=device,
                                                 local_shuffle_buffer_size=cfg.shuffle_buffer or None)
        t = train_epoch(net, optimizer, batches, normalizer, cfg, device)
        loss_sum, correct, n, waited, busy = _all_reduce(
            [t["loss_sum"], t["correct"], t["n"], t["waited"], t["seconds"]], device)
        if n == 0:
            raise RuntimeError(f"no full batch of {per_worker} images per worker: lower --batch-size")
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "lr": lr, "train/loss": loss_sum / n, "train/top1_err": 1 - correct / n,
            "images_per_s": n / t["seconds"], "data_wait_frac": waited / busy, "epoch_seconds": t["seconds"],
        }
        if val_shard is not None:
            modes = ["center"]
            last = epoch + 1 == cfg.epochs
            if last or (cfg.eval_10crop_every and (epoch + 1) % cfg.eval_10crop_every == 0):
                modes.append("10crop")
            for mode in modes:
                e = evaluate(model, val_shard.iter_torch_batches(batch_size=per_worker, device=device),
                             normalizer, cfg, config["size"], mode, device)
                nll, top1, top5, m = _all_reduce([e["nll_sum"], e["top1"], e["top5"], e["n"]], device)
                suffix = "" if mode == "center" else "_10crop"
                metrics |= {f"val/top1_err{suffix}": 1 - top1 / max(m, 1), f"val/top5_err{suffix}": 1 - top5 / max(m, 1)}
                if mode == "center":
                    metrics |= {"val/loss": nll / max(m, 1), "val/images": m}
            scheduler.step(metrics["val/top1_err"])
            best = min(best, metrics["val/top1_err"])
        else:
            scheduler.step(metrics["train/loss"])
        metrics["best_val_top1_err"] = best
        _report(metrics, model, optimizer, scheduler, epoch, best, cfg, rank)


def _report(metrics: dict, model, optimizer, scheduler, epoch: int, best: float, cfg: TrainConfig,
            rank: int) -> None:
    """Every worker reports; rank 0 alone writes the checkpoint (the weights are the same everywhere)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch + 1, "best_top1_err": best, "config": cfg.to_dict()}
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# ---------------------------------------------------------------- the driver side


def format_epoch(m: dict, epochs: int | None = None) -> str:
    """One console line per epoch."""
    parts = [f"epoch {m['epoch']}{f'/{epochs}' if epochs else ''}",
             f"train loss {m['train/loss']:.3f} err {100 * m['train/top1_err']:.1f}%"]
    if "val/top1_err" in m:
        parts.append(f"val err {100 * m['val/top1_err']:.1f}% top5 {100 * m['val/top5_err']:.1f}%")
    if "val/top1_err_10crop" in m:
        parts.append(f"10crop {100 * m['val/top1_err_10crop']:.1f}%")
    parts += [f"lr {m['lr']:.3g}", f"{m['images_per_s']:,.0f} img/s", f"data wait {100 * m['data_wait_frac']:.0f}%",
              f"{m['epoch_seconds']:.1f}s"]
    return "  ".join(parts)


def stall_message(losses: list[float], num_classes: int, epochs: int = 3) -> str | None:
    """The known paper-init stall: the loss sits at ln(num_classes) epoch after epoch."""
    chance = math.log(num_classes)
    if len(losses) >= epochs and all(abs(x - chance) < 0.02 * chance for x in losses[-epochs:]):
        return (f"WARNING: train/loss has stayed at ln({num_classes}) = {chance:.3f} for {len(losses)} epochs: "
                "the net is not learning. Narrow nets with the paper's N(0, 0.01) init stall like this; "
                "use --init pytorch (or a smaller --bias-value / larger --lr).")
    return None


def _mlflow_reporter_class():
    from ray.train import UserCallback

    class MlflowReporter(UserCallback):
        """Runs in the Ray Train controller (on the driver's node): per-epoch metrics to MLflow and the console."""

        def __init__(self, tracking_uri: str, run_id: str, num_classes: int, epochs: int):
            self.tracking_uri, self.run_id, self.num_classes, self.epochs = tracking_uri, run_id, num_classes, epochs
            self.losses: list[float] = []
            self.warned = False

        def after_report(self, run_context, metrics, checkpoint):
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            m = metrics[0]  # rank 0; the figures are already summed over all workers
            step, now = int(m["epoch"]), int(time.time() * 1000)
            client = MlflowClient(self.tracking_uri)
            client.log_batch(self.run_id, metrics=[Metric(k, float(m[k]), now, step)
                                                   for k in (*METRICS, "epoch") if k in m])
            print(format_epoch(m, self.epochs), flush=True)
            self.losses.append(float(m["train/loss"]))
            message = stall_message(self.losses, self.num_classes)
            if message and not self.warned:
                self.warned = True
                print(message, flush=True)
                client.set_tag(self.run_id, "warning", message)

    return MlflowReporter


def storage_path(value: str | None) -> str:
    if value and "://" in value:
        return value
    return str(Path(value or "ray_results").resolve())


def build_trainer(cfg: TrainConfig, prepared: Prepared, run_config):
    """The TorchTrainer of one training run (also one Tune trial)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = cfg.gpus_per_worker > 0
    resources = {k: v for k, v in per_worker_resources(cfg).items() if k == "CPU" or v > 0}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "num_classes": prepared.num_classes, "size": prepared.size,
                           "mean_image": prepared.mean_image, "has_val": bool(prepared.val_files),
                           "init_from": resolve_init_from(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=run_config,
        datasets=build_datasets(cfg, prepared),
        dataset_config=data_config(),
    )


def run_config(cfg: TrainConfig, name: str, storage: str, callbacks: list):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name, storage_path=storage, callbacks=callbacks,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                           checkpoint_score_attribute="val/top1_err", checkpoint_score_order="min"),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
    )


# Config keys that shape the weights: a resumed run must keep them.
SHAPE_KEYS = ("arch", "width", "image_size", "extra_conv")


def classes_digest(wnids: list[str]) -> str:
    """A short fingerprint of a class list (order matters: it is the label index)."""
    import hashlib

    return hashlib.sha1("\n".join(wnids).encode()).hexdigest()[:16]


def _mlflow_run(uri: str, cfg: TrainConfig, name: str, storage: str, prepared: Prepared, log: Log,
                extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run id, resumed): the MLflow run of this Ray Train run, found again by name and storage on a rerun."""
    from mlflow import MlflowClient

    from alexnet.tracking import git_commit

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.ray_run_name = '{name}' and tags.ray_storage = '{storage}'")
    if found:
        run = found[0]
        old = run.data.params
        changed = [k for k in SHAPE_KEYS if k in old and old[k] != str(getattr(cfg, k))]
        if changed:
            raise UsageError(f"run {name!r} was trained with other {', '.join(changed)} "
                             f"({', '.join(f'{k}={old[k]}' for k in changed)}): pick a new --run-name")
        client.update_run(run.info.run_id, status="RUNNING")
        for key, value in (extra_tags or {}).items():
            client.set_tag(run.info.run_id, key, value)
        differ = {k: v for k, v in cfg.to_dict().items() if k in old and old[k] != str(v)}
        if differ:
            client.set_tag(run.info.run_id, "resumed_with", json.dumps(differ, default=str))
        log(f"resuming run {name!r} (MLflow run {run.info.run_id})")
        return run.info.run_id, True
    commit = git_commit()
    tags = {"stage": "train", "ray_run_name": name, "ray_storage": storage, "mlflow.runName": name,
            "data.path": str(prepared.path), "data.size": str(prepared.size),
            "data.train_rows": str(prepared.summary["rows_written"]["train"]),
            "data.val_rows": str(prepared.summary["rows_written"].get("val", 0)),
            "data.preprocess_run_id": str(prepared.summary.get("mlflow_run_id")),
            "data.classes": classes_digest(prepared.wnids), **(extra_tags or {})}
    if cfg.init_from:
        tags["init_from_checkpoint"] = str(resolve_init_from(cfg))
    if commit:
        tags["git_commit"] = commit
    run = client.create_run(exp_id, run_name=name, tags=tags)
    from mlflow.entities import Param

    params = cfg.to_dict() | {"num_classes": prepared.num_classes, "batch_size_per_worker": cfg.batch_size // cfg.num_workers}
    client.log_batch(run.info.run_id, params=[Param(k, "None" if v is None else str(v)) for k, v in params.items()])
    return run.info.run_id, False


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


def checkpoint_of_run(uri: str, run_id: str) -> str:
    """The best checkpoint recorded by a finished training run, by MLflow run id."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        raise UsageError(f"MLflow run {run_id} not found in {uri}") from err
    return checkpoint_location(run)


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
    from alexnet.tracking import absolute_uri, resolve_tracking_uri

    return checkpoint_of_run(absolute_uri(resolve_tracking_uri(cfg.tracking_uri)), cfg.init_from)


def load_initial_weights(model, state: dict) -> list[str]:
    """Copy a checkpoint's weights into `model` (fine-tuning); returns the keys left at their init.

    Every tensor must match in name and shape except the output layer, which stays freshly
    initialised when the class count differs. Anything else (another arch, width, image size or
    sixth conv layer) is a UsageError naming the mismatch.
    """
    from alexnet.model import output_layer

    source = TrainConfig.from_dict(state["config"]) if "config" in state else None
    prefix, _ = output_layer(model)
    own, theirs = model.state_dict(), state["model"]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    wrong = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape)
    replaced = [k for k in wrong if k.startswith(prefix)]
    bad = missing + unexpected + [k for k in wrong if not k.startswith(prefix)]
    if bad:
        what = (f" (it was trained with arch={source.arch}, width={source.width:g}, image_size={source.image_size}, "
                f"extra_conv={source.extra_conv})" if source else "")
        raise UsageError(f"--init-from weights do not fit this model{what}: "
                         f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''} differ")
    model.load_state_dict({k: v for k, v in theirs.items() if k not in replaced}, strict=False)
    return replaced


def model_from_state(state: dict, num_classes: int):
    """A CPU model (both towers on the CPU) holding a checkpoint's weights, in eval mode."""
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model(num_classes=num_classes, devices=None, **cfg.model_options())
    model.load_state_dict(state["model"])
    return model.eval()


def log_final_artifacts(uri: str, run_id: str, model, prepared: Prepared) -> str:
    """The model (any batch size), the conv1 kernel picture and the learning curves; returns the model URI."""
    import mlflow
    from mlflow.models import infer_signature

    from alexnet.visualize import save_kernel_png

    size = model.cfg.image_size
    # batch 2: a batch of 1 would be exported as a fixed dimension (see mlflow.pytorch.save_model)
    example = np.random.default_rng(0).normal(0.0, 50.0, (2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(uri)
    # the fluent API refuses a run outside the process's active experiment (set by an earlier job in-process)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
        # stated requirements: MLflow's inference of them imports the model in a subprocess (~10 s a run);
        # the pt2 export needs torch only, not this package
        info = mlflow.pytorch.log_model(model, name="model", input_example=example,
                                        signature=infer_signature(example, logits),
                                        pip_requirements=mlflow.pytorch.get_default_pip_requirements())
        save_kernel_png(model, Path(tmp) / "conv1_kernels.png")
        _learning_curves_png(uri, run_id, Path(tmp) / "learning_curves.png")
        mlflow.log_artifacts(tmp, artifact_path="train")
    return info.model_uri


def _learning_curves_png(uri: str, run_id: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys in ((ax_loss, ("train/loss", "val/loss")),
                     (ax_err, ("train/top1_err", "val/top1_err", "val/top5_err", "val/top1_err_10crop"))):
        for key in keys:
            history = sorted({m.step: m.value for m in client.get_metric_history(run_id, key)}.items())
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


def per_worker_resources(cfg: TrainConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, "GPU": float(cfg.gpus_per_worker)}


def preflight(cfg: TrainConfig, driver_cpus: float = 0.0) -> tuple[Prepared, str, str]:
    """Every check that can fail before training starts (UsageError), then Ray: (data, tracking URI, storage).

    `driver_cpus`: what a Ray task driving the trainer holds (a Tune trial), besides the workers.
    """
    from alexnet.cluster import check_resources, connect_ray
    from alexnet.tracking import absolute_uri, check_tracking_uri, resolve_tracking_uri

    prepared = read_prepared(cfg.data)
    check_image_size(cfg, prepared)
    uri = absolute_uri(resolve_tracking_uri(cfg.tracking_uri))
    check_tracking_uri(uri)
    init_from = resolve_init_from(cfg)
    if init_from is not None:  # fails here, before Ray starts, when the weights do not fit
        load_initial_weights(build_model(num_classes=prepared.num_classes, **cfg.model_options()), read_state(init_from))
    connect_ray(cfg.address, min_cpus=cfg.num_workers * cfg.cpus_per_worker + 1 + driver_cpus)
    if cfg.check_resources:
        # one CPU beyond the workers: Ray Data's decoding tasks need somewhere to run
        check_resources(per_worker_resources(cfg), cfg.num_workers, spare_cpus=1.0 + driver_cpus)
    return prepared, uri, storage_path(cfg.storage_path)


def run_members(cfg: TrainConfig, log: Log = print) -> list[dict]:
    """`--seeds K`: K runs alike but for their seeds, one after another, tagged as one ensemble group.

    Each member is an ordinary run named GROUP-seedS; rerunning the command resumes unfinished
    members and leaves finished ones as they are.
    """
    import dataclasses

    if cfg.seeds == 1:
        return [run_training(cfg, log)]
    group = cfg.run_name or time.strftime("ensemble-%Y%m%d-%H%M%S")
    preflight(cfg)  # every member would fail alike: fail once, before the first one starts
    summaries = []
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        member = dataclasses.replace(cfg, seed=seed, seeds=1, run_name=f"{group}-seed{seed}")
        log(f"ensemble {group}: member {i + 1}/{cfg.seeds} (seed {seed})")
        summaries.append(run_training(member, log, extra_tags={
            "ensemble_group": group, "ensemble_member": str(i), "ensemble_members": str(cfg.seeds)}))
    return summaries


def run_training(cfg: TrainConfig, log: Log = print, extra_tags: dict[str, str] | None = None) -> dict:
    """The whole run; returns a summary (MLflow run id, best error, model URI). Raises UsageError before any work."""
    from mlflow import MlflowClient
    from ray.train import TrainingFailedError

    prepared, uri, storage = preflight(cfg)
    name = cfg.run_name or time.strftime("alexnet-%Y%m%d-%H%M%S")
    run_id, resumed = _mlflow_run(uri, cfg, name, storage, prepared, log, extra_tags)
    client = MlflowClient(uri)
    log(f"MLflow run {run_id} ({uri}); checkpoints under {storage}/{name}")
    reporter = _mlflow_reporter_class()(uri, run_id, prepared.num_classes, cfg.epochs)
    trainer = build_trainer(cfg, prepared, run_config(cfg, name, storage, [reporter]))
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        client.set_tag(run_id, "error", str(err)[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    best = min(result.best_checkpoints or [(result.checkpoint, {})],
               key=lambda pair: pair[1].get("val/top1_err", math.inf))[0]
    if best is None:
        raise RuntimeError("the run finished without a checkpoint")
    state = load_checkpoint_state(best)
    model = model_from_state(state, prepared.num_classes)
    model_uri = log_final_artifacts(uri, run_id, model, prepared)
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    client.set_tag(run_id, "best_checkpoint", best.path)
    client.set_terminated(run_id, "FINISHED")
    summary = {"mlflow_run_id": run_id, "run_name": name, "resumed": resumed, "model_uri": model_uri,
               "best_val_top1_err": state["best_top1_err"], "best_epoch": state["epoch"],
               "final_metrics": final, "checkpoint": best.path}
    return summary
