"""A training run's MLflow writes that outlive the tracking server going away.

Every write of a training run after it started (epoch metrics, tags, the final model and pictures,
the end status) goes through an `Outbox`: sent at once when the server answers, else kept, in
order, in `mlflow_pending.json` in the run's storage folder, with a warning, and sent before the
next write once the server answers again. Training never stops for tracking. What is still kept
when the run ends is sent by

    python -m alexnet.outbox STORAGE/RUN_NAME
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from alexnet.config import UsageError
from alexnet.tracking import Runs

PENDING_FILE = "mlflow_pending.json"
UNSENT_EXIT = 3

# A failed write is kept and tried again at the next one: a few quick retries instead of MLflow's
# minutes of them (a user's own settings win).
_QUICK_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@contextlib.contextmanager
def quick_retries():
    added = [k for k in _QUICK_RETRIES if k not in os.environ]
    os.environ.update({k: _QUICK_RETRIES[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class Unsent(Exception):
    """The run finished but MLflow still lacks some of it: kept in the storage, sent by `send_command`."""

    def __init__(self, message: str, summaries: list[dict] | None = None):
        super().__init__(message)
        self.summaries = list(summaries or [])


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What a tracking store that is away (or refusing) raises."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    return MlflowException, RequestException, OSError


def send_command(folder: str) -> str:
    return f"python -m alexnet.outbox {folder}"


def storage_fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)


def read_pending(folder: str) -> dict | None:
    """The kept writes of the run whose storage folder is `folder` ({"run_id", "tracking_uri", "ops"}), or None."""
    import pyarrow.fs

    fs, path = storage_fs(f"{folder}/{PENDING_FILE}")
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def apply(runs: Runs, run_id: str, op: dict) -> None:
    """One kept write, sent."""
    kind = op["op"]
    if kind == "metrics":
        runs.log_metrics(run_id, op["metrics"], step=op["step"], ms=op["ms"])
    elif kind == "tags":
        runs.set_tags(run_id, op["tags"])
    elif kind == "final":  # the model and pictures, made again from the kept best checkpoint
        from alexnet.checkpoints import read_state
        from alexnet.reporting import log_final_artifacts

        model_uri, version = log_final_artifacts(runs, run_id, read_state(op["checkpoint"]), op["num_classes"],
                                                 op.get("name", "model"), op.get("register"))
        runs.set_tags(run_id, {"best_checkpoint": op["checkpoint"], "model_uri": model_uri}
                      | ({"registered_model": f"{op['register']}/{version}"} if version else {}))
    elif kind == "finish":
        runs.finish(run_id, op["status"])
    elif kind == "resume":
        runs.resume(run_id)
    elif kind == "files":  # small text artifacts, kept whole in the pending file
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in op["files"].items():
                (Path(tmp) / name).write_text(text)
            runs.log_artifacts(run_id, tmp, artifact_path=op["artifact_path"])
    else:
        raise ValueError(f"unknown kept MLflow write {kind!r}")


class Outbox:
    """The MLflow writes of one run, in order, kept in `folder` while the tracking store fails."""

    def __init__(self, runs: Runs, run_id: str | None, folder: str, log: Callable[[str], None] = print):
        """`run_id` None: the run does not exist yet; the first write is {"op": "create", ...}."""
        kept = read_pending(folder)
        run_id = run_id or (kept or {}).get("run_id")
        self.runs, self.run_id, self.folder, self.log = runs, run_id, folder, log
        if kept and (kept["run_id"], kept["tracking_uri"]) != (run_id, runs.uri):
            raise UsageError(f"{folder}/{PENDING_FILE} holds unsent MLflow writes of run {kept['run_id']} in "
                             f"{kept['tracking_uri']}: send them first ({send_command(folder)})")
        self.ops: list[dict] = kept["ops"] if kept else []
        self.error: str | None = None  # the first failure while the store is away
        self.on_disk = kept is not None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "log"} | {"log": print}

    def write(self, op: dict) -> bool:
        """Sends `op` after whatever is kept; True when nothing is left kept."""
        self.ops.append(op)
        return self.flush()

    def flush(self) -> bool:
        if not self.ops:
            return True
        kept = len(self.ops)
        while self.ops:
            try:
                with quick_retries():
                    if self.ops[0]["op"] == "create":
                        op = self.ops[0]
                        self.run_id = self.runs.create(op["experiment_id"], op["name"], tags=op["tags"],
                                                       params=op["params"], parent_id=op["parent_id"])
                    else:
                        apply(self.runs, self.run_id, self.ops[0])
            except tracking_errors() as err:
                self._keep(err)
                return False
            self.ops.pop(0)
        self._save()
        if self.error is not None:
            self.log(f"MLflow tracking store {self.runs.uri} answers again: {kept} kept write(s) sent")
            self.error = None
        return True

    def _keep(self, err: BaseException) -> None:
        self._save()
        if self.error is None:
            self.error = f"{type(err).__name__}: {str(err)[:500]}"
            self.log(f"WARNING: MLflow tracking store {self.runs.uri} failed ({self.error}); training goes on, "
                     f"its MLflow writes are kept in {self.folder}/{PENDING_FILE} and sent when the store answers")

    def _save(self) -> None:
        fs, path = storage_fs(f"{self.folder}/{PENDING_FILE}")
        if not self.ops:
            if self.on_disk:
                fs.delete_file(path)
                self.on_disk = False
            return
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:  # whole, each time: object stores cannot append
            f.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.runs.uri, "ops": self.ops}).encode())
        self.on_disk = True

    def unsent(self) -> Unsent | None:
        """At the end of the run: what to tell the user when writes are still kept."""
        if not self.ops:
            return None
        return Unsent(f"MLflow tracking store {self.runs.uri} is still failing ({self.error}): the run finished, "
                      f"{len(self.ops)} MLflow write(s) of run {self.run_id} are kept in {self.folder}/"
                      f"{PENDING_FILE}; send them when it answers: {send_command(self.folder)}")


def main(argv: list[str] | None = None) -> int:
    """Sends the kept writes of the run folders given (STORAGE/RUN_NAME)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m alexnet.outbox", description=main.__doc__)
    parser.add_argument("folders", nargs="+", metavar="STORAGE/RUN_NAME")
    parser.add_argument("--tracking-uri", help="where to send them (default: the store the run was logging to)")
    args = parser.parse_args(argv)
    failed = 0
    for folder in args.folders:
        kept = read_pending(folder.rstrip("/"))
        if kept is None:
            print(f"{folder}: nothing kept")
            continue
        outbox = Outbox(Runs(kept["tracking_uri"]), kept["run_id"], folder.rstrip("/"))
        if args.tracking_uri:
            outbox.runs = Runs(args.tracking_uri)
        n = len(outbox.ops)
        if outbox.flush():
            print(f"{folder}: {n} kept MLflow write(s) sent to run {kept['run_id']}")
        else:
            failed += 1
            print(f"error: {folder}: {outbox.error}; {len(outbox.ops)} write(s) still kept", file=sys.stderr)
    return UNSENT_EXIT if failed else 0


if __name__ == "__main__":
    sys.exit(main())
