"""The sweep in MLflow: a parent run, and one nested child run per trial logged from Tune's driver side."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray import tune

from alexnet.config import SweepConfig, UsageError
from alexnet.loop import epoch_metrics
from alexnet.outbox import Outbox, quick_retries, tracking_errors
from alexnet.tracking import Runs, param_value


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
    """Driver side: one nested MLflow child run per trial under the sweep's parent run.

    A trial's writes go through its own outbox (`alexnet.outbox`, kept under STORAGE/SWEEP/mlflow/TRIAL):
    a tracking store that is away never stops the sweep; a trial whose run could not be created yet keeps
    its creation first among its writes."""

    def __init__(self, runs: Runs, experiment_id: str, parent_id: str, sweep: str, base: dict, space: dict,
                 epochs: int, folder: str, console: bool = False):
        self.runs, self.experiment_id, self.parent_id, self.sweep = runs, experiment_id, parent_id, sweep
        self.base, self.space, self.epochs, self.folder = base, space, epochs, folder
        self.console = console  # a line per trial event; no callable is kept: Tune pickles its callbacks
        self.run_ids: dict[str, str] = {}
        self.outboxes: dict[str, Outbox] = {}

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self.run_ids:
            found = self.runs.find(self.experiment_id, {"sweep": self.sweep, "trial_id": trial.trial_id})
            if found:
                self.run_ids[trial.trial_id] = found.info.run_id
            else:
                new = self._new_run(trial)
                self.run_ids[trial.trial_id] = self.runs.create(
                    new["experiment_id"], new["name"], tags=new["tags"], params=new["params"],
                    parent_id=new["parent_id"])
        return self.run_ids[trial.trial_id]

    def _new_run(self, trial) -> dict:
        sampled = {k: v for k, v in trial.config.items() if k in self.space}
        name = f"{self.sweep}-{trial.trial_id}"
        return {"experiment_id": self.experiment_id, "name": name, "parent_id": self.parent_id,
                "tags": {"sweep": self.sweep, "trial_id": trial.trial_id, "stage": "tune-trial",
                         "sampled": json.dumps(sampled)},
                "params": {k: param_value(v) for k, v in {**self.base, **sampled, "run_name": name}.items()}}

    def log(self, line: str) -> None:
        if self.console:
            print(line, flush=True)

    def _write(self, trial, op: dict) -> None:
        if trial.trial_id not in self.outboxes:
            folder = f"{self.folder}/{trial.trial_id}"
            try:
                with quick_retries():
                    outbox = Outbox(self.runs, self._run_id(trial), folder)
            except tracking_errors() as err:  # the run cannot even be looked up: its creation is kept too
                print(f"WARNING: MLflow tracking store {self.runs.uri} failed ({type(err).__name__}: "
                      f"{str(err)[:300]}); the sweep goes on, trial {trial.trial_id}'s MLflow writes are kept "
                      f"in {folder}", flush=True)
                outbox = Outbox(self.runs, None, folder)
                if outbox.run_id is None:
                    outbox.ops.append({"op": "create", **self._new_run(trial)})
            self.outboxes[trial.trial_id] = outbox
        self.outboxes[trial.trial_id].write(op)

    def on_trial_start(self, iteration, trials, trial, **info):
        sampled = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in trial.config.items() if k in self.space)
        self.log(f"trial {trial.trial_id} started: {sampled}")
        self._write(trial, {"op": "resume"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("already_finished"):  # its last epoch, reported again after a resume: logged already
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if "val/top1_err" in result:
            self.log(f"trial {trial.trial_id} epoch {step}/{self.epochs}: val err {100 * result['val/top1_err']:.1f}% "
                     f"(best {100 * result.get('val/top1_err_best', result['val/top1_err']):.1f}%)")
        self._write(trial, {"op": "metrics", "step": step, "metrics": epoch_metrics(result),
                            "ms": int(time.time() * 1000)})

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        early = int(last.get("epoch", 0)) < self.epochs
        self.log(f"trial {trial.trial_id} ended after {int(last.get('epoch', 0))} epoch(s)"
                 f"{' (stopped early by the scheduler)' if early else ''}")
        self._write(trial, {"op": "tags", "tags": {"stopped_early": str(early)}})
        self._write(trial, {"op": "finish", "status": "FINISHED"})

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial_error(trial)
        self.log(f"trial {trial.trial_id} FAILED: {error.strip().splitlines()[-1] if error.strip() else 'no reason'}")
        self._write(trial, {"op": "tags", "tags": {"error": error}})
        self._write(trial, {"op": "finish", "status": "FAILED"})


def kept_folders(folder: str) -> list[str]:
    """The outbox folders under `folder` (a sweep's STORAGE/SWEEP/mlflow) that still keep writes."""
    import pyarrow.fs

    from alexnet.outbox import read_pending, storage_fs

    fs, path = storage_fs(folder)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    subfolders = sorted(f"{folder}/{i.base_name}" for i in infos if i.type == pyarrow.fs.FileType.Directory)
    return [f for f in subfolders if read_pending(f)]


def trial_error(trial) -> str:
    """The end of a failed trial's error text (Tune keeps it in a file), where the reason is."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text().strip() if path else ""
    except OSError:
        text = ""
    return text[-3000:] or str(path or "trial failed")
