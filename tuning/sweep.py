"""Ray Tune sweeps over the training run: one TorchTrainer per trial, ASHA, MLflow parent + child runs.

Logging happens on the driver only (a Tune callback, `tuning.logger`), so trials need no tracking access.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

from alexnet.config import Interrupted, Log, SweepConfig, TrainConfig, UsageError
from alexnet.model import ModelConfig
from alexnet.prepared import Prepared, read_prepared
from alexnet.train import (build_trainer, check_image_size, not_granted, per_worker_resources, preflight,
                           run_config)

METRIC = "val/top1_err"


def _trial(config: dict, base: TrainConfig, prepared: Prepared, sweep: str, storage: str) -> None:
    """One Tune trial: a whole training run with the sampled values, its reports forwarded to Tune."""
    from ray import tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from alexnet.checkpoints import finished_metrics

    name = f"{sweep}-{tune.get_context().get_trial_id()}"
    cfg = base.with_overrides({**config, "run_name": name})
    if (done := finished_metrics(storage, name, cfg.epochs)) is not None:
        # resumed after its last epoch (Ctrl-C between it and Tune's bookkeeping): Ray Train would report
        # nothing, and Tune refuses a trial that ends without its metric
        tune.report(done | {"already_finished": 1})  # the logger does not log these twice
        return
    trainer = build_trainer(cfg, prepared, run_config(cfg, name, storage, [TuneReportCallback()]))
    try:
        trainer.fit()
    except TrainingFailedError as err:
        waited = not_granted(cfg, err)
        if waited:  # the trial fails saying what it waited for, not with Ray Train's generic timeout
            raise RuntimeError(str(waited)) from err
        raise


# The trial itself only waits on its TorchTrainer: a token CPU share (Tune refuses an empty request).
# It still counts: with 2 CPUs, 0.01 + one 1-CPU worker left 0.99 CPU and Ray Data's 1-CPU decoding
# tasks never started (the demo's sweep hung), so every CPU budget below includes it.
TRIAL_CPUS = 0.01


def default_concurrency(cfg: TrainConfig) -> int:
    """Trials the cluster runs at once: whole trials of num_workers workers, one CPU left for decoding."""
    from alexnet.cluster import worker_capacity

    import ray

    by_workers = worker_capacity(per_worker_resources(cfg)) // cfg.num_workers
    cpus = ray.cluster_resources().get("CPU", 1.0)
    by_cpus = int(cpus // (cfg.num_workers * cfg.cpus_per_worker + 1 + TRIAL_CPUS)) if cfg.cpus_per_worker else by_workers
    return max(1, min(by_workers, by_cpus))


def command_line(cfg: TrainConfig) -> str:
    """The pipelines/train.py command that retrains `cfg` (only the flags that differ from the defaults) as a
    training run: in the training runs' experiment, not the sweep's."""
    parts = ["python pipelines/train.py", f"--data {cfg.data}"]
    model_options = {f.name for f in dataclasses.fields(ModelConfig)}
    # in --help's order: the training flags, then the model's
    for f in sorted(dataclasses.fields(TrainConfig), key=lambda f: f.name in model_options):
        value = getattr(cfg, f.name)
        if f.name in ("data", "run_name", "experiment") or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        parts.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value:g}"
                     if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def run_sweep(cfg: SweepConfig, log: Log = print) -> dict:
    """The whole sweep; returns a summary with the table rows, the best trial and the failure count."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from alexnet.console import quiet
    from alexnet.tracking import Runs
    from alexnet.outbox import Outbox, quick_retries, tracking_errors
    from tuning.logger import MlflowSweepLogger, kept_folders, open_parent_run
    from tuning.space import check_space, load_space, to_tune

    space = load_space(cfg.space, grid=cfg.search == "grid")
    base = cfg.train_config()
    data = read_prepared(base.data)
    check_image_size(base, data)  # the base first: a space's value is blamed only for what it changes
    check_space(space, base, data.size, source=str(cfg.space or "search space"))
    prepared, uri, storage = preflight(base, driver_cpus=TRIAL_CPUS, log=log)
    if not prepared.val_files:
        raise UsageError(f"a sweep ranks trials by {METRIC}: {prepared.path} has no validation split")
    name = cfg.sweep_name or time.strftime("sweep-%Y%m%d-%H%M%S")
    runs = Runs(uri)
    exp_id, parent_id = open_parent_run(runs, cfg, name, storage, space)
    concurrent = cfg.max_concurrent or default_concurrency(base)
    log(f"sweep {name!r}: {cfg.num_samples} trial(s), up to {concurrent} at once, scheduler {cfg.scheduler}; "
        f"MLflow parent run {parent_id}")

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, prepared=prepared, sweep=name, storage=storage), {"CPU": TRIAL_CPUS})
    param_space = to_tune(space)
    path = f"{storage}/{name}"
    if cfg.resume:
        if not tune.Tuner.can_restore(path):
            raise UsageError(f"no Tune experiment at {path} to resume")
        tuner = tune.Tuner.restore(path, trainable=trainable, param_space=param_space, resume_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.grace_period,
                                   reduction_factor=2) if cfg.scheduler == "asha" else None)
        logger = MlflowSweepLogger(runs, exp_id, parent_id, name, base.to_dict(), space, cfg.epochs,
                                   f"{path}/mlflow", console=True)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler, num_samples=cfg.num_samples,
                                        max_concurrent_trials=concurrent,
                                        search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent)),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[logger],
                                      verbose=0 if quiet() else None,  # quiet: our logger's line per trial event
                                      failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    # Tune ends on Ctrl-C and returns what it has: trials never started, or one our logger never saw end
    try:
        with quick_retries():
            unended = runs.search(exp_id, f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'")
    except (UsageError, *tracking_errors()):  # the tracking store is away: count the trials only
        unended = []
    expected = cfg.num_samples * math.prod(len(s["grid"]) for s in space.values() if "grid" in s)
    if unended or len(grid) < expected:
        for child in unended:
            runs.finish(child.info.run_id, "KILLED")
        runs.set_tags(parent_id, {"interrupted": "true"})
        runs.finish(parent_id, "KILLED")
        raise Interrupted(f"interrupted: sweep {name!r} stopped, its unfinished trials and MLflow parent run "
                          f"{parent_id} are KILLED; continue it with --sweep-name {name} --resume")
    rows = []
    for result in grid:
        m = result.metrics or {}
        sampled = {k: result.config.get(k) for k in space}
        rows.append({"trial": result.path.rstrip("/").split("/")[-1], "status": "failed" if result.error else "ok",
                     "epochs": int(m.get("epoch", 0)), "val/top1_err_best": m.get("val/top1_err_best", math.inf),
                     "val_top1_err": m.get(METRIC, math.inf), **sampled})
    rows.sort(key=lambda r: r["val/top1_err_best"])
    failed = sum(r["status"] == "failed" for r in rows)
    ok = [r for r in rows if r["status"] == "ok" and math.isfinite(r["val/top1_err_best"])]
    best = ok[0] if ok else None
    best_cfg = base.with_overrides({k: best[k] for k in space} | {"run_name": None}) if best else None
    table = format_table(rows, list(space))
    parent = Outbox(runs, parent_id, f"{path}/mlflow/parent", log)  # kept, not lost, if the store is away
    parent.write({"op": "files", "artifact_path": "tune", "files": {
        "sweep_summary.md": table + "\n", "sweep_summary.json": json.dumps(rows, indent=1, default=str)}})
    if best:
        parent.write({"op": "metrics", "step": 0, "metrics": {"val/top1_err_best": best["val/top1_err_best"]},
                      "ms": int(time.time() * 1000)})
        parent.write({"op": "tags", "tags": {"best_config": json.dumps({k: best[k] for k in space}),
                                             "best_command": command_line(best_cfg)}})
    parent.write({"op": "tags", "tags": {"failed_trials": str(failed), "interrupted": "false"}})
    parent.write({"op": "finish", "status": "FINISHED" if not failed else "FAILED"})
    return {"sweep_name": name, "parent_run_id": parent_id, "rows": rows, "table": table, "failed": failed,
            "best": best, "best_command": command_line(best_cfg) if best_cfg else None,
            "unsent": kept_folders(f"{path}/mlflow"), "tracking_uri": uri}


def format_table(rows: list[dict], keys: list[str]) -> str:
    """Markdown table of the trials, best first."""
    head = ["trial", "status", "epochs", "best val err", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        err = f"{100 * r['val/top1_err_best']:.1f}%" if math.isfinite(r["val/top1_err_best"]) else "-"
        vals = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join([r["trial"], r["status"], str(r["epochs"]), err, *vals]) + " |")
    return "\n".join(lines)
