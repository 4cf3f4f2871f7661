"""The sweep in MLflow: a parent run, and one nested child run per trial logged from Tune's driver side."""

from __future__ import annotations

import json
from pathlib import Path

from ray import tune

from alexnet.config import SweepConfig, UsageError
from alexnet.loop import epoch_metrics
from alexnet.tracking import Runs


def open_parent_run(runs: Runs, cfg: SweepConfig, name: str, storage: str, space: dict) -> tuple[str, str]:
    """(experiment id, parent run id); the parent is found again on --resume."""
    exp_id = runs.experiment_id(cfg.experiment)
    found = runs.find(exp_id, {"sweep_name": name, "ray_storage": storage})
    if found:
        if not cfg.resume:
            raise UsageError(f"sweep {name!r} exists: pass --resume to continue it, or pick a new --sweep-name")
        runs.resume(found.info.run_id)
        return exp_id, found.info.run_id
    if cfg.resume:
        raise UsageError(f"no sweep {name!r} under {storage} to resume")
    params = {"space": json.dumps(space), "scheduler": cfg.scheduler, "grace_period": cfg.grace_period,
              "search": cfg.search, "num_samples": cfg.num_samples, "epochs": cfg.epochs, "data": str(cfg.data)}
    run_id = runs.create(exp_id, name, tags={"stage": "tune", "sweep_name": name, "ray_storage": storage},
                         params=params)
    return exp_id, run_id


class MlflowSweepLogger(tune.Callback):
    """Driver side: one nested MLflow child run per trial under the sweep's parent run."""

    def __init__(self, runs: Runs, experiment_id: str, parent_id: str, sweep: str, base: dict, space: dict,
                 epochs: int):
        self.runs, self.experiment_id, self.parent_id, self.sweep = runs, experiment_id, parent_id, sweep
        self.base, self.space, self.epochs = base, space, epochs
        self.run_ids: dict[str, str] = {}

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self.run_ids:
            found = self.runs.find(self.experiment_id, {"sweep": self.sweep, "trial_id": trial.trial_id})
            if found:
                self.run_ids[trial.trial_id] = found.info.run_id
            else:
                sampled = {k: v for k, v in trial.config.items() if k in self.space}
                name = f"{self.sweep}-{trial.trial_id}"
                self.run_ids[trial.trial_id] = self.runs.create(
                    self.experiment_id, name, parent_id=self.parent_id,
                    tags={"sweep": self.sweep, "trial_id": trial.trial_id, "stage": "tune-trial",
                          "sampled": json.dumps(sampled)},
                    params={**self.base, **sampled, "run_name": name})
        return self.run_ids[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.runs.resume(self._run_id(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self.runs.log_metrics(self._run_id(trial), epoch_metrics(result), step=step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        run_id = self._run_id(trial)
        self.runs.set_tags(run_id, {"stopped_early": str(int(last.get("epoch", 0)) < self.epochs)})
        self.runs.finish(run_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        self.runs.set_tags(run_id, {"error": trial_error(trial)})
        self.runs.finish(run_id, "FAILED")


def trial_error(trial) -> str:
    """The end of a failed trial's error text (Tune keeps it in a file), where the reason is."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text().strip() if path else ""
    except OSError:
        text = ""
    return text[-3000:] or str(path or "trial failed")
