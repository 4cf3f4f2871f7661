"""Shared fixtures: one local Ray instance, one SQLite MLflow store and one sample tree per session."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from alexnet.cluster import start_local_ray
from alexnet.config import PreprocessConfig
from alexnet.sample import SampleConfig, make_sample

# Ray's token authentication on, as Ray 2.60 turns it on for a new cluster: every Ray instance a test
# starts (the shared one, `ray start` clusters) and every driver it runs share this session's token
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

SAMPLE = dict(num_classes=4, train_per_class=16, val_per_class=4, seed=7, broken=4)
PREPARED_SIZE = 72


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    unmarked = [item.nodeid for item in items if "ray_cluster" in item.fixturenames and "integration" not in item.keywords]
    if unmarked:  # `make test-fast` must never start Ray
        raise pytest.UsageError("tests using the shared Ray instance must carry the integration marker: "
                                + ", ".join(unmarked))
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance shared by every integration test (start-up costs seconds)."""
    import ray

    before = os.environ.get("RAY_ADDRESS")
    # 4 logical CPUs on 2 cores: two training workers plus Ray Data tasks must fit at once
    # the dashboard process is kept: Tune driving Train trials needs it to remove placement groups
    # a new instance even where $RAY_ADDRESS or a `ray start` on this machine says otherwise, with its
    # address known to all its processes (start_local_ray)
    address = start_local_ray(4, include_dashboard=True, log_to_driver=False)
    # ...but not in this process: Ray's Jobs API and state clients take $RAY_ADDRESS over the address
    # they are given, and tests talk to other clusters as well
    _restore("RAY_ADDRESS", before)
    yield address
    ray.shutdown()


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """The session's SQLite store, also as $MLFLOW_TRACKING_URI (put back as it was when the session ends)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    _restore("MLFLOW_TRACKING_URI", before)


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("imagenet") / "root"
    return root, make_sample(SampleConfig(output=root, **SAMPLE))


@pytest.fixture(scope="session")
def prepared(sample_tree, ray_cluster, mlflow_uri, tmp_path_factory) -> tuple[Path, dict]:
    """The sample tree preprocessed once at 72 px; read-only for the tests that use it."""
    from alexnet.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("prepared") / "out"
    cfg = PreprocessConfig(input=sample_tree[0], output=out, size=PREPARED_SIZE, tracking_uri=mlflow_uri)
    return out, run_preprocess(cfg, log=lambda _: None)


# A small net that a CPU trains in seconds (the paper's init stalls at this width: see README).
SMALL_TRAIN_ARGS = ["--width", "0.25", "--image-size", "64", "--init", "pytorch", "--batch-size", "32",
                    "--lr", "0.005", "--eval-10crop-every", "0"]


@pytest.fixture
def small_args() -> list[str]:
    return list(SMALL_TRAIN_ARGS)


@pytest.fixture(scope="session")
def learnable(ray_cluster, mlflow_uri, tmp_path_factory) -> Path:
    """4 classes x 50 training images, 72 px shards: enough for a narrow net to beat chance quickly."""
    from alexnet.preprocess import run_preprocess

    root = tmp_path_factory.mktemp("learnable") / "root"
    make_sample(SampleConfig(output=root, num_classes=4, train_per_class=50, val_per_class=12, seed=11,
                             quirks=False, min_side=72, max_side=160))
    out = root.parent / "prepared"
    run_preprocess(PreprocessConfig(input=root, output=out, size=72, tracking_uri=mlflow_uri), log=lambda _: None)
    return out


def names_in_two_places(run) -> set[str]:
    """Names an MLflow run holds as both a param and a tag, or as a metric and a param or tag: one name is one
    thing (the UI's columns and filters would otherwise show two values under it)."""
    params, tags, metrics = set(run.data.params), set(run.data.tags), set(run.data.metrics)
    return (params & tags) | (metrics & (params | tags))
