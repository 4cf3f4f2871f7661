"""Ray Tune sweeps over the training run: one TorchTrainer per trial, ASHA, MLflow parent + child runs.

Logging happens on the driver only (a Tune callback), so trials need no tracking access.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from alexnet.config import SweepConfig, TrainConfig, UsageError
from alexnet.train import (METRICS, Log, Prepared, build_trainer, per_worker_resources, preflight, run_config)

METRIC = "val/top1_err"


def trial_config(base: dict, sampled: dict, run_name: str) -> TrainConfig:
    return TrainConfig.from_dict({**base, **sampled, "run_name": run_name})


def _trial(config: dict, prepared: Prepared) -> None:
    """One Tune trial: a whole training run, its reports forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    sweep = config["_sweep"]
    name = f"{sweep['name']}-{tune.get_context().get_trial_id()}"
    cfg = trial_config(sweep["base"], {k: v for k, v in config.items() if not k.startswith("_")}, name)
    trainer = build_trainer(cfg, prepared, run_config(cfg, name, sweep["storage"], [TuneReportCallback()]))
    trainer.fit()


def _sweep_logger_class():
    from ray import tune

    class MlflowSweepLogger(tune.Callback):
        """Driver side: one nested MLflow child run per trial under the sweep's parent run."""

        def __init__(self, uri: str, experiment_id: str, parent_id: str, sweep: str, base: dict, space: dict,
                     epochs: int):
            self.uri, self.experiment_id, self.parent_id, self.sweep = uri, experiment_id, parent_id, sweep
            self.base, self.space, self.epochs = base, space, epochs
            self.runs: dict[str, str] = {}

        def _client(self):
            from mlflow import MlflowClient

            return MlflowClient(self.uri)

        def _run_id(self, trial) -> str:
            if trial.trial_id in self.runs:
                return self.runs[trial.trial_id]
            client = self._client()
            found = client.search_runs([self.experiment_id], filter_string=(
                f"tags.sweep = '{self.sweep}' and tags.trial_id = '{trial.trial_id}'"))
            if found:
                run_id = found[0].info.run_id
            else:
                from mlflow.entities import Param

                sampled = {k: v for k, v in trial.config.items() if k in self.space}
                run = client.create_run(self.experiment_id, run_name=f"{self.sweep}-{trial.trial_id}", tags={
                    "mlflow.parentRunId": self.parent_id, "sweep": self.sweep, "trial_id": trial.trial_id,
                    "stage": "tune-trial", "sampled": json.dumps(sampled)})
                run_id = run.info.run_id
                params = {**self.base, **sampled, "run_name": f"{self.sweep}-{trial.trial_id}"}
                client.log_batch(run_id, params=[Param(k, "None" if v is None else str(v)) for k, v in params.items()])
            self.runs[trial.trial_id] = run_id
            return run_id

        def on_trial_start(self, iteration, trials, trial, **info):
            run_id = self._run_id(trial)
            self._client().update_run(run_id, status="RUNNING")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            from mlflow.entities import Metric

            step, now = int(result.get("epoch", result.get("training_iteration", 0))), int(time.time() * 1000)
            metrics = [Metric(k, float(result[k]), now, step) for k in (*METRICS, "epoch") if k in result]
            self._client().log_batch(self._run_id(trial), metrics=metrics)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            client = self._client()
            run_id = self._run_id(trial)
            client.set_tag(run_id, "stopped_early", str(int(last.get("epoch", 0)) < self.epochs))
            client.set_terminated(run_id, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            client = self._client()
            run_id = self._run_id(trial)
            client.set_tag(run_id, "error", str(getattr(trial, "error_file", "") or "trial failed"))
            client.set_terminated(run_id, "FAILED")

    return MlflowSweepLogger


def _parent_run(uri: str, cfg: SweepConfig, name: str, storage: str, space: dict) -> tuple[str, str]:
    """(experiment id, parent run id); the parent is found again on --resume."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from alexnet.tracking import git_commit

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.sweep_name = '{name}' and tags.ray_storage = '{storage}'")
    if found:
        if not cfg.resume:
            raise UsageError(f"sweep {name!r} exists: pass --resume to continue it, or pick a new --sweep-name")
        client.update_run(found[0].info.run_id, status="RUNNING")
        return exp_id, found[0].info.run_id
    if cfg.resume:
        raise UsageError(f"no sweep {name!r} under {storage} to resume")
    tags = {"stage": "tune", "sweep_name": name, "ray_storage": storage}
    if commit := git_commit():
        tags["git_commit"] = commit
    run = client.create_run(exp_id, run_name=name, tags=tags)
    params = {"space": json.dumps(space), "scheduler": cfg.scheduler, "grace_period": cfg.grace_period,
              "search": cfg.search, "num_samples": cfg.num_samples, "epochs": cfg.epochs, "data": str(cfg.data)}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return exp_id, run.info.run_id


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
    """The pipelines/train.py command that retrains `cfg` (only the flags that differ from the defaults)."""
    parts = ["python pipelines/train.py", f"--data {cfg.data}"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in ("data", "run_name") or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        parts.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value:g}"
                     if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def run_sweep(cfg: SweepConfig, log: Log = print) -> dict:
    """The whole sweep; returns a summary with the table rows, the best trial and the failure count."""
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from tuning.space import load_space, to_tune

    space = load_space(cfg.space, grid=cfg.search == "grid")
    base = cfg.train_config()
    prepared, uri, storage = preflight(base, driver_cpus=TRIAL_CPUS)
    if not prepared.val_files:
        raise UsageError(f"a sweep ranks trials by {METRIC}: {prepared.path} has no validation split")
    name = cfg.sweep_name or time.strftime("sweep-%Y%m%d-%H%M%S")
    exp_id, parent_id = _parent_run(uri, cfg, name, storage, space)
    concurrent = cfg.max_concurrent or default_concurrency(base)
    log(f"sweep {name!r}: {cfg.num_samples} trial(s), up to {concurrent} at once, scheduler {cfg.scheduler}; "
        f"MLflow parent run {parent_id}")

    trainable = tune.with_resources(tune.with_parameters(_trial, prepared=prepared), {"CPU": TRIAL_CPUS})
    param_space = {**to_tune(space), "_sweep": {"name": name, "storage": storage, "base": base.to_dict()}}
    path = f"{storage}/{name}"
    if cfg.resume:
        if not tune.Tuner.can_restore(path):
            raise UsageError(f"no Tune experiment at {path} to resume")
        tuner = tune.Tuner.restore(path, trainable=trainable, param_space=param_space, resume_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.grace_period,
                                   reduction_factor=2) if cfg.scheduler == "asha" else None)
        logger = _sweep_logger_class()(uri, exp_id, parent_id, name, base.to_dict(), space, cfg.epochs)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler, num_samples=cfg.num_samples,
                                        max_concurrent_trials=concurrent,
                                        search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent)),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[logger],
                                      failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    rows = []
    for result in grid:
        m = result.metrics or {}
        sampled = {k: result.config.get(k) for k in space}
        rows.append({"trial": result.path.rstrip("/").split("/")[-1], "status": "failed" if result.error else "ok",
                     "epochs": int(m.get("epoch", 0)), "best_val_top1_err": m.get("best_val_top1_err", math.inf),
                     "val_top1_err": m.get(METRIC, math.inf), **sampled})
    rows.sort(key=lambda r: r["best_val_top1_err"])
    failed = sum(r["status"] == "failed" for r in rows)
    ok = [r for r in rows if r["status"] == "ok" and math.isfinite(r["best_val_top1_err"])]
    best = ok[0] if ok else None
    best_cfg = trial_config(base.to_dict(), {k: best[k] for k in space}, None) if best else None
    table = format_table(rows, list(space))
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep_summary.md").write_text(table + "\n")
        (Path(tmp) / "sweep_summary.json").write_text(json.dumps(rows, indent=1, default=str))
        client.log_artifacts(parent_id, tmp, artifact_path="tune")
    if best:
        client.log_metric(parent_id, "best/val/top1_err", best["best_val_top1_err"])
        client.set_tag(parent_id, "best_config", json.dumps({k: best[k] for k in space}))
        client.set_tag(parent_id, "best_command", command_line(best_cfg))
    client.set_tag(parent_id, "failed_trials", str(failed))
    client.set_terminated(parent_id, "FINISHED" if not failed else "FAILED")
    return {"sweep_name": name, "parent_run_id": parent_id, "rows": rows, "table": table, "failed": failed,
            "best": best, "best_command": command_line(best_cfg) if best_cfg else None}


def format_table(rows: list[dict], keys: list[str]) -> str:
    """Markdown table of the trials, best first."""
    head = ["trial", "status", "epochs", "best val err", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        err = f"{100 * r['best_val_top1_err']:.1f}%" if math.isfinite(r["best_val_top1_err"]) else "-"
        vals = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join([r["trial"], r["status"], str(r["epochs"]), err, *vals]) + " |")
    return "\n".join(lines)
