"""Inside a Ray Train worker: pure-PyTorch epochs and evaluation, reported with `ray.train.report`.

Two towers over the worker's devices, DDP across workers, a checkpoint every epoch (rank 0),
resumed from `ray.train.get_checkpoint()` after a restart.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from alexnet.augment import Normalizer, eval_views
from alexnet.checkpoints import (load_initial_weights, read_state, report_with_checkpoint, restore_training_state,
                                 training_state)
from alexnet.config import TrainConfig
from alexnet.model import build_model
from alexnet.optim import build_optimizer
from alexnet.stream import stream_per_worker

# Per-epoch metrics, as reported by the workers and logged to MLflow with the epoch as the step (the epoch
# itself and the validation image count are in every report, not charted: the step is the epoch, and the
# count is the run's data.val_rows less val/damaged_images).
METRICS = ("train/loss", "train/top1_err", "val/loss", "val/top1_err", "val/top5_err", "val/top1_err_10crop",
           "val/top5_err_10crop", "val/top1_err_best", "train/lr", "images_per_s", "data_wait_frac",
           "epoch_seconds", "train/damaged_images", "val/damaged_images", "first_batch_s", "train/images")
# Logged once for every epoch done, in every mode (training, --input-only, sweep trials): its steps are the epochs.
EPOCH_CLOCK = "epoch_seconds"


FIRST = ("epoch", "val/top1_err", "val/top5_err", "train/loss")


def epoch_metrics(report: dict) -> dict[str, float]:
    """The METRICS present in one epoch's report (or a Tune result holding it), as floats."""
    return {k: float(report[k]) for k in METRICS if k in report}


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


def model_input(batch: dict, normalizer: Normalizer, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """A training batch as the model gets it: float, minus the mean image, plus lighting, on `device`. With
    --input-only --input-until crops: the uint8 crops on `device`, before that device-side part."""
    if cfg.input_only and cfg.input_until == "crops":
        return batch["image"].to(device, non_blocking=True)
    return normalizer(batch["image"], batch["offset"], batch["flip"], batch["light"] if cfg.pca_lighting else None)


def train_epoch(net, optimizer, batches, normalizer: Normalizer, cfg: TrainConfig, device: torch.device) -> dict:
    """One pass over this worker's shard; sums (not means) so that workers can be added up. `net` None
    (--input-only): each batch is made into the model's input on the device, then dropped."""
    if net is not None:
        net.train()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct, images, damaged images
    waited, start, first = 0.0, time.perf_counter(), None
    ready = time.perf_counter()
    for batch in batches:
        waited += time.perf_counter() - ready
        first = first if first is not None else time.perf_counter() - start
        x = model_input(batch, normalizer, cfg, device)
        y = batch["label"].to(device, non_blocking=True)
        valid = batch["valid"].to(device, non_blocking=True).double()  # damaged stored images: masked out
        if net is None:
            totals += torch.stack([x.new_zeros((), dtype=torch.float64), valid.new_zeros(()), valid.sum(),
                                   len(y) - valid.sum()])
            ready = time.perf_counter()
            continue
        with _autocast(cfg, device):
            logits = net(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        count = valid.sum()
        loss = (losses * valid).sum() / count.clamp_min(1)  # every worker still steps (DDP lockstep)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            totals += torch.stack([loss.detach().double() * count, ((logits.argmax(1) == y) * valid).sum(),
                                   count, len(y) - count])
        ready = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loss_sum, correct, n, damaged = totals.tolist()
    return {"loss_sum": loss_sum, "correct": correct, "n": n, "damaged": damaged, "waited": waited,
            "seconds": time.perf_counter() - start, "first_batch_s": first or 0.0}


def view_batch(normalizer: Normalizer, images: torch.Tensor, size: int, crop: int, mode: str):
    """The model inputs of each test view ('center', or the paper's '10crop') of whole stored images."""
    for top, left, flip in eval_views(size, crop, mode):
        yield normalizer.view(images, top, left, flip, crop)


@torch.no_grad()
def view_probs(model, images: torch.Tensor, normalizer: Normalizer, cfg: TrainConfig, size: int, mode: str,
               device: torch.device) -> torch.Tensor:
    """Softmax averaged over the test views of `mode` of whole stored images."""
    probs, views = 0, 0
    for x in view_batch(normalizer, images, size, cfg.image_size, mode):
        with _autocast(cfg, device):
            probs = probs + model(x).float().softmax(1)
        views += 1
    return probs / views


def evaluate(model, batches, normalizer: Normalizer, cfg: TrainConfig, size: int, mode: str,
             device: torch.device) -> dict:
    """Sums of loss, top-1 and top-5 hits over `batches`, softmax averaged over the views of `mode`."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # nll sum, top1, top5, images, damaged images
    for batch in batches:
        y = batch["label"].to(device, non_blocking=True)
        valid = batch["valid"].to(device, non_blocking=True).double()  # damaged stored images: left out, counted
        probs = view_probs(model, batch["image"], normalizer, cfg, size, mode, device)
        k = min(5, probs.shape[1])
        topk = probs.topk(k, 1).indices
        hits = (topk == y[:, None]).double() * valid[:, None]
        nll = -(probs.gather(1, y[:, None]).clamp_min(1e-12).log()[:, 0] * valid).sum()
        totals += torch.stack([nll.double(), hits[:, 0].sum(), hits.amax(1).sum(), valid.sum(), len(y) - valid.sum()])
    return dict(zip(("nll_sum", "top1", "top5", "n", "damaged"), totals.tolist()))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Dropout masks: a function of (seed, epoch, rank), so a resumed run draws what an unbroken one would."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


def _validate(model, val_shard, normalizer, cfg: TrainConfig, size: int, per_worker: int, epoch: int,
              device: torch.device) -> dict[str, float]:
    """Centre-patch metrics every epoch; the paper's 10 patches every eval_10crop_every epochs and at the end."""
    modes = ["center"]
    if epoch + 1 == cfg.epochs or (cfg.eval_10crop_every and (epoch + 1) % cfg.eval_10crop_every == 0):
        modes.append("10crop")
    metrics = {}
    for mode in modes:
        e = evaluate(model, val_shard.iter_torch_batches(batch_size=per_worker, device=device),
                     normalizer, cfg, size, mode, device)
        nll, top1, top5, m, damaged = _all_reduce([e["nll_sum"], e["top1"], e["top5"], e["n"], e["damaged"]], device)
        suffix = "" if mode == "center" else "_10crop"
        metrics |= {f"val/top1_err{suffix}": 1 - top1 / max(m, 1), f"val/top5_err{suffix}": 1 - top5 / max(m, 1)}
        if mode == "center":
            metrics |= {"val/loss": nll / max(m, 1), "val/images": m, "val/damaged_images": damaged}
    return metrics


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: config = {"cfg": TrainConfig dict, "num_classes", "size", "mean_image", "has_val",
    "init_from", "train": stream.train_plan}."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    cfg = TrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    devices = list(ray.train.torch.get_devices()) if cfg.gpus_per_worker else [torch.device("cpu")]
    device = devices[0]  # input, output layer and loss live on the first device
    normalizer = Normalizer(config["mean_image"], device, cfg.pixel_scale, cfg.channels_last, reuse_output=True)
    per_worker = cfg.batch_size // world
    if cfg.input_only:
        stream = stream_per_worker(cfg, config["train"], rank, world, per_worker, device, first_epoch=0)
        return _input_only_per_worker(cfg, stream, normalizer, device, world)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, config["num_classes"], devices)
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
    start_epoch, best = restore_training_state(model, optimizer, scheduler, ray.train.get_checkpoint())
    if start_epoch == 0 and config.get("init_from"):
        load_initial_weights(model, read_state(config["init_from"]))
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    stream = stream_per_worker(cfg, config["train"], rank, world, per_worker, device, first_epoch=start_epoch)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            torch.manual_seed(_epoch_seed(cfg.seed, epoch, rank))
            lr = optimizer.param_groups[0]["lr"]
            t = train_epoch(net, optimizer, stream.epoch(epoch), normalizer, cfg, device)
            loss_sum, correct, n, damaged, waited, busy = _all_reduce(
                [t["loss_sum"], t["correct"], t["n"], t["damaged"], t["waited"], t["seconds"]], device)
            if n == 0:
                raise RuntimeError(f"epoch {epoch + 1}: no training image decoded (all {damaged:.0f} damaged)")
            if not math.isfinite(loss_sum):  # nothing later can recover: stop instead of training on NaNs
                raise RuntimeError(f"training diverged in epoch {epoch + 1}: train/loss is {loss_sum / n} "
                                   f"(lower --lr, now {lr:g})")
            metrics: dict[str, Any] = {
                "epoch": epoch + 1, "train/lr": lr, "train/loss": loss_sum / n, "train/top1_err": 1 - correct / n,
                "train/damaged_images": damaged,
                "images_per_s": n / t["seconds"], "data_wait_frac": waited / busy, "epoch_seconds": t["seconds"],
                "first_batch_s": t["first_batch_s"],
            }
            if val_shard is not None:
                metrics |= _validate(model, val_shard, normalizer, cfg, config["size"], per_worker, epoch, device)
                scheduler.step(metrics["val/top1_err"])
                best = min(best, metrics["val/top1_err"])
            else:
                scheduler.step(metrics["train/loss"])
            metrics["val/top1_err_best"] = best
            metrics = {k: metrics[k] for k in FIRST if k in metrics} | metrics  # the columns of Tune's status table
            if rank == 0:  # the weights are the same on every worker: one writes the checkpoint
                state = training_state(model, optimizer, scheduler, epoch + 1, best, cfg) | {"metrics": metrics}
                report_with_checkpoint(metrics, state)
            else:
                ray.train.report(metrics)
    finally:
        stream.close()


def _input_only_per_worker(cfg: TrainConfig, stream, normalizer: Normalizer, device: torch.device,
                           world: int) -> None:
    """--input-only: the epochs of the training input alone, measured as the model would receive it."""
    import ray.train

    try:
        for epoch in range(cfg.epochs):
            t = train_epoch(None, None, stream.epoch(epoch), normalizer, cfg, device)
            n, damaged, waited, busy, first = _all_reduce(
                [t["n"], t["damaged"], t["waited"], t["seconds"], t["first_batch_s"]], device)
            ray.train.report({"epoch": epoch + 1, "train/images": n + damaged, "train/damaged_images": damaged,
                              "images_per_s": n / t["seconds"], "data_wait_frac": waited / busy,
                              "epoch_seconds": t["seconds"], "first_batch_s": first / world})
    finally:
        stream.close()
