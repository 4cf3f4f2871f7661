"""The paper's training run on Ray Train (V2), logged to MLflow from the driver side.

Checks (data, sizes, tracking server, cluster resources) -> Ray Data inputs (`alexnet.datasets`)
-> `TorchTrainer` over `alexnet.loop.train_loop_per_worker` -> the final model, kernel picture and
learning curves (`alexnet.reporting`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

from alexnet.checkpoints import (check_resumable, load_checkpoint_state, load_initial_weights,
                                 read_state, resolve_init_from)
from alexnet.config import Interrupted, Log, TrainConfig, UsageError
from alexnet.loop import EPOCH_CLOCK
from alexnet.outbox import Unsent
from alexnet.prepared import Prepared, read_prepared


def per_worker_resources(cfg: TrainConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, "GPU": float(cfg.gpus_per_worker)}


def storage_path(value: str | None) -> str:
    if value and "://" in value:
        return value
    return str(Path(value or "ray_results").resolve())


def check_image_size(cfg: TrainConfig, prepared: Prepared) -> None:
    if cfg.image_size > prepared.size:
        raise UsageError(f"--image-size {cfg.image_size} is larger than the stored images ({prepared.size} px in "
                         f"{prepared.path}); crop at most {prepared.size} or preprocess with a larger --size")


def preflight(cfg: TrainConfig, driver_cpus: float = 0.0, log: Log = print) -> tuple[Prepared, str, str]:
    """Every check that can fail before training starts (UsageError), then Ray: (data, tracking URI, storage).

    `driver_cpus`: what a Ray task driving the trainer holds (a Tune trial), besides the workers.
    """
    from alexnet.cluster import check_resources, connect_ray
    from alexnet.model import build_model
    from alexnet.tracking import check_tracking_uri, resolve_tracking_uri

    prepared = read_prepared(cfg.data)
    check_image_size(cfg, prepared)
    if cfg.decode == "gpu" and prepared.chroma != "444":
        log("WARNING: --decode gpu on JPEGs stored with 4:2:0 chroma: nvJPEG upsamples colour unlike the CPU path "
            "(measured on an H200: 12% of pixels off by more than 1 grey level, mean 0.64); preprocess with "
            "--chroma 444 to train on the CPU path's pixels")
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_uri(uri)
    init_from = resolve_init_from(cfg)
    if init_from is not None:  # fails here, before Ray starts, when the weights do not fit
        load_initial_weights(build_model(cfg, prepared.num_classes), read_state(init_from))
    # A local instance: the workers' CPUs on top of the cores, so that Ray Data's decoding tasks may use every core
    # (a worker feeding a GPU, or --input-only, leaves its own CPU idle while it waits for data)
    connect_ray(cfg.address, min_cpus=(os.cpu_count() or 1) + cfg.num_workers * cfg.cpus_per_worker + driver_cpus,
                log=log)
    if cfg.check_resources:
        # one CPU beyond the workers: Ray Data's decoding tasks need somewhere to run
        check_resources(per_worker_resources(cfg), cfg.num_workers, spare_cpus=1.0 + driver_cpus)
    else:
        log(f"--no-check-resources: the {cfg.num_workers} worker(s) wait for the cluster to grant their resources "
            "without a limit (new nodes of an autoscaler, a replaced node)")
    return prepared, uri, storage_path(cfg.storage_path)


def run_config(cfg: TrainConfig, name: str, storage: str, callbacks: list):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name, storage_path=storage, callbacks=callbacks,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                           checkpoint_score_attribute="val/top1_err", checkpoint_score_order="min"),
        # a worker group that cannot start within --resource-wait-s ends the run (see build_trainer);
        # without the check, Ray Train retries its start for ever
        failure_config=FailureConfig(max_failures=cfg.max_failures,
                                     controller_failure_limit=0 if cfg.check_resources else -1),
    )


def not_granted(cfg: TrainConfig, err: BaseException) -> UsageError | None:
    """The error to report when a run failed because the cluster never granted its workers' resources."""
    from alexnet.cluster import wait_message, waited_too_long

    if not waited_too_long(err):
        return None
    return UsageError(wait_message(per_worker_resources(cfg), cfg.num_workers, cfg.resource_wait_s))


def build_trainer(cfg: TrainConfig, prepared: Prepared, run_config):
    """The TorchTrainer of one training run (also one Tune trial)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from alexnet.datasets import ValSplitUnequally, build_datasets
    from alexnet.loop import train_loop_per_worker
    from alexnet.stream import train_plan

    from alexnet.cluster import bound_worker_wait

    bound_worker_wait(cfg.resource_wait_s if cfg.check_resources else None)
    gpu = cfg.gpus_per_worker > 0
    resources = {k: v for k, v in per_worker_resources(cfg).items() if k == "CPU" or v > 0}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "num_classes": prepared.num_classes, "size": prepared.size,
                           "mean_image": prepared.mean_image, "has_val": bool(prepared.val_files),
                           "init_from": resolve_init_from(cfg), "train": train_plan(prepared, cfg.num_workers)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=run_config,
        datasets=build_datasets(prepared),
        dataset_config=ValSplitUnequally(),
    )


def run_members(cfg: TrainConfig, log: Log = print) -> list[dict]:
    """`--seeds K`: K runs alike but for their seeds, one after another, tagged as one ensemble group.

    Each member is an ordinary run named GROUP-seedS; rerunning the command resumes unfinished
    members and leaves finished ones as they are.
    """
    if cfg.seeds == 1:
        return [run_training(cfg, log)]
    group = cfg.run_name or time.strftime("ensemble-%Y%m%d-%H%M%S")
    preflight(cfg, log=log)  # every member would fail alike: fail once, before the first one starts
    summaries, unsent = [], []
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        member = dataclasses.replace(cfg, seed=seed, seeds=1, run_name=f"{group}-seed{seed}")
        done = finished_member(member)
        if done is not None:
            log(f"ensemble {group}: member {i + 1}/{cfg.seeds} ({member.run_name}) has finished its "
                f"{cfg.epochs} epochs: left as it is (MLflow run {done['mlflow_run_id']})")
            summaries.append(done)
            continue
        log(f"ensemble {group}: member {i + 1}/{cfg.seeds} (seed {seed})")
        try:
            summaries.append(run_training(member, log, tags={
                "ensemble_group": group, "ensemble_member": str(i), "ensemble_members": str(cfg.seeds)}))
        except Unsent as err:  # the member finished: the next one trains while its writes wait
            summaries += err.summaries
            unsent.append(str(err))
    if unsent:
        raise Unsent("\n".join(unsent), summaries)
    return summaries


def finished_member(cfg: TrainConfig) -> dict | None:
    """The summary of this run if it already FINISHED all of cfg.epochs, read from MLflow; else None."""
    from alexnet.tracking import Runs, resolve_tracking_uri

    runs = Runs(resolve_tracking_uri(cfg.tracking_uri))
    run = runs.find(runs.experiment_id(cfg.experiment),
                    {"ray_run_name": cfg.run_name, "ray_storage": storage_path(cfg.storage_path)})
    if run is None or run.info.status != "FINISHED":
        return None
    epochs = [step for step, _ in runs.metric_history(run.info.run_id, EPOCH_CLOCK)]
    if not epochs or max(epochs) < cfg.epochs:  # a larger --epochs extends it
        return None
    errors = runs.metric_history(run.info.run_id, "val/top1_err")
    return {"mlflow_run_id": run.info.run_id, "run_name": cfg.run_name, "resumed": False, "left_as_it_is": True,
            "model_uri": run.data.tags.get("model_uri", "(see the run's logged model)"),
            "val/top1_err_best": run.data.metrics.get("val/top1_err_best", math.nan),
            "best_epoch": min(errors, key=lambda e: (e[1], -e[0]))[0] if errors else max(epochs),
            "final_metrics": {}, "checkpoint": run.data.tags.get("best_checkpoint")}


def run_training(cfg: TrainConfig, log: Log = print, tags: dict[str, str] | None = None) -> dict:
    """The whole run; returns a summary (MLflow run id, best error, model URI). Raises UsageError before any work."""
    from ray.train import TrainingFailedError

    from alexnet.console import Relay
    from alexnet.outbox import Outbox
    from alexnet.reporting import TrainingReporter, open_training_run
    from alexnet.tracking import Runs

    name = cfg.run_name or time.strftime("input-only-%Y%m%d-%H%M%S" if cfg.input_only else "alexnet-%Y%m%d-%H%M%S")
    check_resumable(storage_path(cfg.storage_path), name, log)  # a rerun with no readable checkpoint: exit 2 now
    prepared, uri, storage = preflight(cfg, log=log)
    runs = Runs(uri)
    tags = dict(tags or {}) | ({"init_from_checkpoint": str(resolve_init_from(cfg))} if cfg.init_from else {})
    run_id, resumed = open_training_run(runs, cfg, name, storage, prepared, log, tags)
    log(f"MLflow run {run_id} ({uri}); checkpoints under {storage}/{name}")
    folder = f"{storage}/{name}"
    relay = Relay()  # the reporter runs in the Ray Train controller: its lines come back through this
    reporter = TrainingReporter(Outbox(runs, run_id, folder, log), prepared.num_classes, cfg.epochs, relay)
    trainer = build_trainer(cfg, prepared, run_config(cfg, name, storage, [reporter]))
    try:
        with relay.printing(log):
            result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as stop:  # Ray Train's own Ctrl-C handler exits with SystemExit(0)
        Outbox(runs, run_id, folder, log).write({"op": "finish", "status": "KILLED"})
        raise Interrupted(f"interrupted: MLflow run {run_id} is KILLED; checkpoints under {folder}; "
                          "rerun the same command to resume") from stop
    except TrainingFailedError as err:
        waited = not_granted(cfg, err)
        outbox = Outbox(runs, run_id, folder, log)  # what the controller kept is in the folder: read it again
        outbox.write({"op": "tags", "tags": {"error": (str(waited) if waited else str(err))[:5000]}})
        outbox.write({"op": "finish", "status": "FAILED"})  # a store that is away never hides this error
        if waited:
            raise waited from err
        raise
    if cfg.input_only:
        return input_summary(runs, run_id, name, Outbox(runs, run_id, folder, log))
    # the lowest val/top1_err; of equal ones the latest epoch (Ray keeps the latest checkpoint, not every tie)
    best = min(result.best_checkpoints or [(result.checkpoint, {})],
               key=lambda pair: (pair[1].get("val/top1_err", math.inf), -pair[1].get("epoch", 0)))[0]
    if best is None:
        raise RuntimeError("the run finished without a checkpoint")
    state = load_checkpoint_state(best)
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    outbox = Outbox(runs, run_id, folder, log)
    where = best.path if "://" not in storage else f"{storage.split('://')[0]}://{best.path}"
    outbox.write({"op": "final", "checkpoint": where, "num_classes": prepared.num_classes, "name": name,
                  "register": cfg.register_model})
    outbox.write({"op": "finish", "status": "FINISHED"})
    logged = runs.get(run_id).data.tags if not outbox.ops else {}
    summary = {"mlflow_run_id": run_id, "run_name": name, "resumed": resumed,
               "model_uri": logged.get("model_uri", "(not logged yet: see below)"),
               "registered_model": logged.get("registered_model"),
               "val/top1_err_best": state["best_top1_err"], "best_epoch": state["epoch"],
               "final_metrics": final, "checkpoint": where}
    if unsent := outbox.unsent():
        unsent.summaries = [summary]
        raise unsent
    return summary


def input_summary(runs, run_id: str, name: str, outbox) -> dict:
    """--input-only: the run finished with no model; its best epoch's delivery rate."""
    outbox.write({"op": "finish", "status": "FINISHED"})
    summary = {"mlflow_run_id": run_id, "run_name": name, "input_only": True}
    if not outbox.ops:
        rates = runs.metric_history(run_id, "images_per_s")
        waits = dict(runs.metric_history(run_id, "first_batch_s"))
        epoch, rate = max(rates, key=lambda e: e[1])
        summary |= {"images_per_s": rate, "best_epoch": epoch, "first_batch_s": waits.get(epoch, math.nan)}
    if unsent := outbox.unsent():
        unsent.summaries = [summary]
        raise unsent
    return summary
