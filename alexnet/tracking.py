"""MLflow: where runs go, a reachability check before any work, and logging from the driver."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from alexnet.config import UsageError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the local SQLite store mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_uri(uri: str) -> str:
    """A relative SQLite path made absolute: Ray processes do not share the driver's working directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's retries, when a tracking server does not answer."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError:
            pass  # it answered (e.g. 401 behind basic auth): reachable
        except (urllib.error.URLError, OSError) as err:
            raise UsageError(f"MLflow tracking server {uri} is unreachable: {err}") from err
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise UsageError(f"folder of the MLflow store {uri} does not exist")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def start_run(uri: str, experiment: str, run_name: str | None, tags: dict[str, str] | None = None):
    """An active MLflow run (use as a context manager)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    commit = git_commit()
    return mlflow.start_run(run_name=run_name, tags={**({"git_commit": commit} if commit else {}), **(tags or {})})


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()})


def log_artifacts(paths: Iterable[Path], artifact_path: str | None = None) -> None:
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
