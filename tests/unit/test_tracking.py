"""alexnet.tracking.Runs on a real SQLite MLflow store: find-or-create by tags, params as strings, metric
batches, and a logged model that leaves MLflow's process-wide state as it was."""

from __future__ import annotations

import os
import pickle

import mlflow
import pytest
import torch

from alexnet.tracking import Runs, param_value, resolve_tracking_uri


@pytest.fixture
def runs(tmp_path) -> Runs:
    return Runs(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_runs_are_found_again_by_all_their_tags(runs):
    exp = runs.experiment_id("e")
    assert runs.experiment_id("e") == exp  # found, not created twice
    first = runs.create(exp, "a", tags={"sweep": "s1", "trial_id": "t1"})
    runs.create(exp, "b", tags={"sweep": "s1", "trial_id": "t2"})
    assert runs.find(exp, {"sweep": "s1", "trial_id": "t1"}).info.run_id == first
    assert runs.find(exp, {"sweep": "s2", "trial_id": "t1"}) is None
    child = runs.create(exp, "c", parent_id=first)
    assert runs.get(child).data.tags["mlflow.parentRunId"] == first


def test_params_metrics_and_tags_round_trip(runs):
    run_id = runs.create(runs.experiment_id("e"), "r", params={"lr": 0.01, "init_from": None, "sizes": [1, 5, 7]})
    assert runs.get(run_id).data.params == {"lr": "0.01", "init_from": "None", "sizes": "1 5 7"}
    assert param_value((1, 5)) == "1 5"
    runs.log_metrics(run_id, {"train/loss": 2.0, "epoch": 1}, step=1)
    runs.log_metrics(run_id, {"train/loss": 1.5, "epoch": 2}, step=2)
    runs.log_metrics(run_id, {"train/loss": 1.25}, step=2)  # logged again for a step: the last value wins
    assert runs.metric_history(run_id, "train/loss") == [(1, 2.0), (2, 1.25)]
    runs.set_tags(run_id, {"best_checkpoint": "/x"})
    runs.finish(run_id, "FAILED")
    run = runs.get(run_id)
    assert run.data.tags["best_checkpoint"] == "/x" and run.info.status == "FAILED"


def test_a_copy_sent_to_another_process_reconnects(runs):
    exp = runs.experiment_id("e")
    copy = pickle.loads(pickle.dumps(runs))
    assert copy.uri == runs.uri and copy.experiment_id("e") == exp


@pytest.mark.parametrize("env_before", [None, "sqlite:////elsewhere/mlflow.db"])
def test_logging_a_model_leaves_mlflows_process_wide_state_as_it_was(runs, monkeypatch, env_before):
    if env_before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_before)
    mlflow.set_tracking_uri(env_before)
    run_id = runs.create(runs.experiment_id("models"), "m")
    model = torch.nn.Linear(4, 2)
    x = torch.zeros(2, 4).numpy()
    try:
        uri, version = runs.log_model(run_id, model, x, model(torch.from_numpy(x)).detach().numpy())
        assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
        assert mlflow.get_tracking_uri() != runs.uri  # not left pointing at the store just used
        assert mlflow.active_run() is None
        assert resolve_tracking_uri(None) == (env_before or resolve_tracking_uri("sqlite:///mlflow.db"))
    finally:
        mlflow.set_tracking_uri(None)  # back to following $MLFLOW_TRACKING_URI, which monkeypatch restores
    (logged,) = runs.client.search_logged_models(experiment_ids=[runs.get(run_id).info.experiment_id])
    assert logged.source_run_id == run_id and uri == f"models:/{logged.model_id}" and version is None


def test_a_logged_model_carries_its_epochs_metrics_and_registers_without_changing_the_runs_history(runs):
    """A training run's model is its best epoch's checkpoint: the model shows that epoch's metrics (not the last
    epoch's), the run's charts keep one point per epoch, and --register-model gives version 1, then 2."""
    from alexnet.tracking import logged_model_name

    run_id = runs.create(runs.experiment_id("models"), "m")
    for epoch, err in ((1, 0.6), (2, 0.3), (3, 0.4)):
        runs.log_metrics(run_id, {"val/top1_err": err, "train/loss": 3.0 / epoch}, step=epoch)
    runs.log_metrics(run_id, {"val/top1_err_10crop": 0.35}, step=3)
    model = torch.nn.Linear(4, 2)
    x = torch.zeros(2, 4).numpy()
    y = model(torch.from_numpy(x)).detach().numpy()
    assert logged_model_name("five.seed 1/x", "epoch2") == "five-seed-1-x-epoch2"
    uri, version = runs.log_model(run_id, model, x, y, name=logged_model_name("m", "epoch2"), step=2, params={"width": 0.25},
                                  register_as="alexnet-test")
    assert version == "1"
    (logged,) = runs.client.search_logged_models(experiment_ids=[runs.get(run_id).info.experiment_id],
                                                 filter_string=f"source_run_id = '{run_id}'")
    assert logged.name == "m-epoch2" and logged.params == {"width": "0.25"}
    assert {m.key: m.value for m in logged.metrics} == {"val/top1_err": 0.3, "train/loss": 1.5}
    assert {m.step for m in logged.metrics} == {2}
    for key, steps in (("val/top1_err", [1, 2, 3]), ("train/loss", [1, 2, 3]), ("val/top1_err_10crop", [3])):
        assert [m.step for m in runs.client.get_metric_history(run_id, key)] == steps, key  # nothing doubled
    assert runs.client.get_model_version("alexnet-test", "1").source == uri
    assert runs.log_model(run_id, model, x, y, name="again", register_as="alexnet-test")[1] == "2"


def test_a_kept_run_creation_is_sent_first_and_the_rest_lands_in_that_run(runs, tmp_path):
    """A sweep trial that started while the store was away keeps its run's creation first among its writes;
    `python -m alexnet.outbox FOLDER` later creates it and sends the rest there, in order."""
    from alexnet.outbox import PENDING_FILE, Outbox, main

    exp = runs.experiment_id("kept")
    folder = str(tmp_path / "trial")
    outbox = Outbox(runs, None, folder)
    outbox.ops += [{"op": "create", "experiment_id": exp, "name": "late", "parent_id": None,
                    "tags": {"trial_id": "t1"}, "params": {"lr": "0.01"}},
                   {"op": "resume"}, {"op": "metrics", "step": 1, "metrics": {"x": 0.5}, "ms": 5}]
    outbox._save()  # as a sweep leaves it when the store never answered
    assert (tmp_path / "trial" / PENDING_FILE).exists()
    assert main([folder]) == 0
    run = runs.find(exp, {"trial_id": "t1"})
    assert run.data.params == {"lr": "0.01"} and run.info.status == "RUNNING"
    assert runs.metric_history(run.info.run_id, "x") == [(1, 0.5)]
    assert not (tmp_path / "trial" / PENDING_FILE).exists()
    assert main([folder]) == 0  # nothing left: says so
