"""MLflow, owned here: where runs go, a reachability check, and every read and write of runs.

Everything goes through an `MlflowClient` bound to one tracking URI (`Runs`). MLflow's
process-wide tracking URI is touched in one place only, `Runs.log_model` (its fluent API needs
it), and put back afterwards; no active experiment is ever set.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from alexnet.config import UsageError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the local SQLite store mlflow.db; relative paths made absolute."""
    return absolute_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def absolute_uri(uri: str) -> str:
    """A relative SQLite path made absolute: Ray processes do not share the driver's working directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's retries, when a tracking server does not answer or refuses us."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as err:
            _refuse_auth(uri, err.code)  # a proxy guarding everything; any other answer: reachable
        except (urllib.error.URLError, OSError) as err:
            raise UsageError(f"MLflow tracking server {uri} is unreachable: {err}") from err
        # /health answers everyone (basic auth leaves it open): ask what the runs will ask, with our credentials
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        resp = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                            max_retries=0, timeout=timeout_s, raise_on_status=False, params={"max_results": 1})
        _refuse_auth(uri, resp.status_code)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise UsageError(f"folder of the MLflow store {uri} does not exist")


def _refuse_auth(uri: str, status: int) -> None:
    if status == 401:
        raise UsageError(f"MLflow tracking server {uri} requires authentication: set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of that server")
    if status == 403:
        raise UsageError(f"MLflow tracking server {uri} refuses this account (403 Forbidden): it may not read "
                         "experiments; ask the server's admin for access")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def param_value(value: Any) -> str:
    """How a config value is written as an MLflow param (lists as space-separated words)."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "None" if value is None else str(value)


def _tag_filter(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())


def logged_model_name(*parts: str) -> str:
    """A LoggedModel name saying what the model is (MLflow allows no . / : % ' " in one): the parts joined by -."""
    return re.sub(r"[./:%'\"\s]+", "-", "-".join(parts))


class Runs:
    """The runs of one tracking store. Picklable (it travels to Ray Train's controller as a callback's field)."""

    def __init__(self, uri: str):
        self.uri = uri

    def __getstate__(self) -> dict:
        return {"uri": self.uri}  # the client (a database engine) is made again where it lands

    @functools.cached_property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created when it does not exist yet."""
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else self.client.create_experiment(name)

    def existing_experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            raise UsageError(f"MLflow experiment {name!r} not found in {self.uri}")
        return experiment.experiment_id

    def find(self, experiment_id: str, tags: dict[str, str]):
        """The run carrying all of `tags`, or None."""
        found = self.client.search_runs([experiment_id], filter_string=_tag_filter(tags), max_results=1)
        return found[0] if found else None

    def search(self, experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.search_runs([experiment_id], filter_string=filter_string, order_by=order_by,
                                           max_results=10_000)
        except MlflowException as err:
            raise UsageError(f"MLflow filter {filter_string!r}: {err.message}") from err

    def get(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as err:
            raise UsageError(f"MLflow run {run_id} not found in {self.uri}") from err

    def create(self, experiment_id: str, name: str | None, tags: dict[str, str] | None = None,
               params: dict[str, Any] | None = None, parent_id: str | None = None,
               start_time: float | None = None) -> str:
        """A new run (tagged with this checkout's git commit and its parent, if any; started at `start_time`, a
        time.time(), when the job began before its run was made); returns its id."""
        tags = dict(tags or {})
        if commit := git_commit():
            tags.setdefault("git_commit", commit)
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run_id = self.client.create_run(experiment_id, run_name=name, tags=tags,
                                        start_time=int(start_time * 1000) if start_time else None).info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, param_value(v)) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, ms: int | None = None) -> None:
        """`ms`: when they were measured (a kept write sent later), default now."""
        from mlflow.entities import Metric

        ms = ms or int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ms, step) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, folder: Path | str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)

    def log_files(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def artifact_names(self, run_id: str, folder: str) -> set[str]:
        return {Path(a.path).name for a in self.client.list_artifacts(run_id, folder)}

    @contextlib.contextmanager
    def downloaded(self, run_id: str, artifact: str) -> Iterator[Path]:
        """A run's artifact as a local file, for the duration of the block."""
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(self.client.download_artifacts(run_id, artifact, tmp))

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs, one per step (the last value logged wins), in step order."""
        return sorted({m.step: m.value for m in self.client.get_metric_history(run_id, key)}.items())

    def resume(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def log_model(self, run_id: str, model, example, output, name: str = "model", step: int = 0,
                  params: dict | None = None, tags: dict | None = None,
                  register_as: str | None = None) -> tuple[str, str | None]:
        """A PyTorch model (any batch size) as the run's LoggedModel `name`, carrying the run's metrics of `step`
        (the epoch it comes from), registered as `register_as` when given: (models:/ URI, registered version)."""
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)  # the fluent log_model knows no other way; put back below
        try:
            with mlflow.start_run(run_id=run_id):
                # stated requirements: MLflow's inference of them imports the model in a subprocess
                # (~10 s a run); the pt2 export needs torch only, not this package
                info = mlflow.pytorch.log_model(model, name=name, input_example=example, step=step,
                                                signature=infer_signature(example, output), params=params, tags=tags,
                                                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                                                registered_model_name=register_as)
        finally:
            mlflow.set_tracking_uri(before)
        self.link_metrics(run_id, info.model_id, step)
        return info.model_uri, (str(info.registered_model_version) if register_as else None)

    def link_metrics(self, run_id: str, model_id: str, step: int) -> None:
        """The run's metrics of `step` shown on the logged model too: logged again with the same key, step, time
        and value (the store keeps one row per those, so the run's history does not change) and the model's id."""
        from mlflow.entities import Metric

        keys = self.get(run_id).data.metrics
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id)
                  for key in keys for m in self.client.get_metric_history(run_id, key) if m.step == step]
        if linked:
            self.client.log_batch(run_id, metrics=linked)

    def log_pyfunc(self, run_id: str, name: str, python_model, artifacts: dict[str, str], register_as: str | None,
                   example=None) -> tuple[str, str | None]:
        """A pyfunc model taking a column `image` of image bytes as the run's LoggedModel, registered as
        `register_as` when given: (models:/ URI of the logged model, registered version or None)."""
        import mlflow
        import mlflow.pyfunc
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        import alexnet

        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)  # as in log_model; the registry follows the tracking URI
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name=name, python_model=python_model, artifacts=artifacts,
                    signature=ModelSignature(inputs=Schema([ColSpec("binary", "image")])),
                    code_paths=[str(Path(alexnet.__file__).parent)],  # the model loads without this checkout
                    pip_requirements=["torch", "torchvision", "pillow", "simplejpeg", "numpy", "pandas", "pyarrow", "pyyaml",
                                      "mlflow"],
                    registered_model_name=register_as)
        finally:
            mlflow.set_tracking_uri(before)
        self.link_metrics(run_id, info.model_id, 0)
        return info.model_uri, (str(info.registered_model_version) if register_as else None)
