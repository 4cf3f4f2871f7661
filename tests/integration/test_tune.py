"""pipelines/tune.py on the shared local Ray instance: ASHA, MLflow parent/children, resume, bad spaces."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines import tune as cli
from tests.conftest import names_in_two_places
from tuning.space import contains

pytestmark = pytest.mark.integration  # the shared Ray instance, MLflow servers, subprocess entry points

REPO = Path(__file__).resolve().parents[2]


def _children(uri: str, parent_id: str):
    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def _parent(uri: str, sweep: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweeps")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.sweep_name = '{sweep}'")
    return run


def test_a_sweep_with_asha_logs_a_parent_and_one_child_per_trial(learnable, small_args, mlflow_uri, tmp_path, capsys):
    # a grid of a good and a hopeless learning rate, in that order and one at a time: ASHA must
    # stop the hopeless trial at the first rung (epoch 2), where the good one is already recorded
    space = {"lr": {"grid": [0.01, 1e-6]}, "dropout": {"uniform": [0.3, 0.7]}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    argv = ["--data", str(learnable), *small_args, "--batch-size", "16", "--epochs", "3", "--num-samples", "1",
            "--search", "grid",
            "--space", str(tmp_path / "space.yaml"), "--grace-period", "2", "--max-concurrent", "1",
            "--sweep-name", "asha", "--storage-path", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "retrain with:" in out and "python pipelines/train.py --data" in out
    parent = _parent(mlflow_uri, "asha")
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["space"]) == space
    assert "val/top1_err_best" in parent.data.metrics
    assert json.loads(parent.data.tags["best_config"])["lr"] == 0.01
    children = _children(mlflow_uri, parent.info.run_id)
    assert len(children) == 2
    assert not any(names_in_two_places(r) for r in [parent, *children])
    epochs = []
    for child in children:
        assert child.info.status == "FINISHED"
        for key, spec in space.items():
            assert contains(spec, float(child.data.params[key])), (key, child.data.params[key])
        assert child.data.params["width"] == "0.25"  # the full config, not only the sampled values
        epochs.append(len(MlflowClient(mlflow_uri).get_metric_history(child.info.run_id, "val/top1_err")))
    assert sorted(epochs) == [2, 3], epochs  # ASHA stopped the hopeless trial at the rung
    stopped = {float(c.data.params["lr"]): c.data.tags["stopped_early"] for c in children}
    assert stopped == {0.01: "False", 1e-6: "True"}, stopped
    assert MlflowClient(mlflow_uri).list_artifacts(parent.info.run_id, "tune")
    # Tune and Train leave no placement group behind (their cleaners remove them within seconds)
    import ray

    deadline, left = time.time() + 60, None
    while time.time() < deadline and left != []:
        left = [pg["bundles"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        time.sleep(1)
    assert left == [], left


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(learnable, small_args, mlflow_uri, ray_cluster,
                                                                         tmp_path):
    argv = ["--data", str(learnable), *small_args, "--epochs", "2", "--num-samples", "2", "--max-concurrent", "1",
            "--scheduler", "none", "--sweep-name", "resumable", "--storage-path", str(tmp_path),
            "--tracking-uri", mlflow_uri]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "pipelines/tune.py", *argv, "--address", ray_cluster], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        finished = []
        while time.time() < deadline and not finished:
            time.sleep(1)
            try:
                parent = _parent(mlflow_uri, "resumable")
            except ValueError:
                continue
            finished = [c for c in _children(mlflow_uri, parent.info.run_id) if c.info.status == "FINISHED"]
        assert finished, "no trial finished before the deadline"
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {c.info.run_id: len(MlflowClient(mlflow_uri).get_metric_history(c.info.run_id, "epoch_seconds"))
                   for c in finished}
    assert cli.main([*argv, "--resume"]) == 0
    parent = _parent(mlflow_uri, "resumable")
    children = _children(mlflow_uri, parent.info.run_id)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for run_id, n in done_before.items():  # finished trials were not run again
        assert len(MlflowClient(mlflow_uri).get_metric_history(run_id, "epoch_seconds")) == n


@pytest.mark.parametrize("space, message", [
    ("learning_rate: {loguniform: [0.001, 0.1]}\n", "not a tunable training option"),
    ("lr: {gaussian: [0.01, 0.1]}\n", "unknown distribution"),
    ("lr: {loguniform: [0.0, 0.1]}\n", "low > 0"),
])
def test_a_bad_search_space_exits_2_before_anything_starts(tmp_path, capsys, space, message):
    (tmp_path / "space.yaml").write_text(space)
    start = time.time()
    assert cli.main(["--data", str(tmp_path), "--space", str(tmp_path / "space.yaml")]) == 2
    assert message in capsys.readouterr().err
    assert time.time() - start < 10


def test_a_sweep_asking_for_more_gpus_than_any_node_has_exits_2(learnable, small_args, tmp_path, capsys):
    argv = ["--data", str(learnable), *small_args, "--gpus-per-worker", "2", "--storage-path", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "2 GPU on a single node" in capsys.readouterr().err


def test_a_sweep_on_its_own_local_ray_beside_another_instance_and_a_dead_clusters_address_file(
        learnable, small_args, tmp_path, ray_cluster):
    """The session's Ray instance runs on this machine, and Ray's temp dir holds the address file of a
    `ray start` cluster that stopped uncleanly. A sweep without --address reports the dead address,
    starts its own instance, and every process of its job finds that instance, not "multiple active
    Ray instances" (Ray Train's placement-group cleaner looks the cluster up by itself; when it failed,
    an ASHA-stopped trial's placement group was never removed and the next trial waited for ever)."""
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths stay < 108 bytes
    (temp / "ray").mkdir()
    with socket.socket() as s:  # a port nothing listens on: the stopped cluster's GCS
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    (temp / "ray" / "ray_current_cluster").write_text(dead)
    space = {"lr": {"grid": [0.01, 1e-6, 0.01]}}  # ASHA stops the second; the third needs its resources
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--data", str(learnable), *small_args, "--batch-size", "16", "--epochs", "3", "--num-samples", "1",
            "--search", "grid", "--space", str(tmp_path / "space.yaml"), "--grace-period", "2",
            "--max-concurrent", "1", "--sweep-name", "beside", "--storage-path", str(tmp_path), "--tracking-uri", uri]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp),
                                                                         "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run([sys.executable, "pipelines/tune.py", *argv], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900, start_new_session=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert f"Ray: no cluster answers at {dead} (from the address file of `ray start` on this node); ignoring it" in out
    assert "Ray: started a local instance" in out
    assert "multiple active Ray instances" not in out and "Failed to query Ray Train Controller" not in out, out[-4000:]
    parent = _parent(uri, "beside")
    children = _children(uri, parent.info.run_id)
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert sorted(c.data.tags["stopped_early"] for c in children) == ["False", "False", "True"]


def test_a_space_training_would_refuse_exits_2_before_ray_naming_the_key(learnable, small_args, tmp_path, capsys):
    """Measured before the check: `dropout: {uniform: [0.5, 1.5]}` failed trial by trial, exit 65 after 67 s."""
    (tmp_path / "space.yaml").write_text("dropout: {uniform: [0.5, 1.5]}\n")
    start = time.time()
    assert cli.main(["--data", str(learnable), *small_args, "--space", str(tmp_path / "space.yaml"),
                     "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dropout: uniform [0.5, 1.5] can give" in err and "within [0, 1)" in err, err
    assert time.time() - start < 10 and not list(tmp_path.glob("sweep-*"))


def test_a_failing_trial_is_a_failed_child_with_its_reason_the_others_finish_and_the_exit_code_counts_it(
        learnable, small_args, mlflow_uri, tmp_path, capsys):
    """lr 1e6 diverges in its first epoch (train/loss nan): that trial fails with the reason, the other
    finishes, the parent is FAILED with failed_trials 1, and the exit code is 64 + 1."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"lr": {"grid": [0.01, 1.0e6]}}))
    argv = ["--data", str(learnable), *small_args, "--epochs", "2", "--num-samples", "1", "--search", "grid",
            "--space", str(tmp_path / "space.yaml"), "--scheduler", "none", "--max-concurrent", "1",
            "--max-failures", "0", "--sweep-name", "one-fails", "--storage-path", str(tmp_path)]
    assert cli.main(argv) == 65
    assert "error: 1 trial(s) failed" in capsys.readouterr().err
    parent = _parent(mlflow_uri, "one-fails")
    assert parent.info.status == "FAILED" and parent.data.tags["failed_trials"] == "1"
    children = {float(c.data.params["lr"]): c for c in _children(mlflow_uri, parent.info.run_id)}
    assert set(children) == {0.01, 1e6}
    assert children[0.01].info.status == "FINISHED"
    assert children[1e6].info.status == "FAILED" and "training diverged in epoch 1" in children[1e6].data.tags["error"]
    assert json.loads(parent.data.tags["best_config"])["lr"] == 0.01


def test_ctrl_c_on_a_sweep_kills_its_runs_exits_130_and_resume_finishes_it(learnable, small_args, mlflow_uri,
                                                                          ray_cluster, tmp_path):
    """Measured before: the interrupted trial was reported `ok` and the parent FINISHED with failed_trials 0."""
    argv = ["--data", str(learnable), *small_args, "--epochs", "3", "--num-samples", "2", "--max-concurrent", "1",
            "--scheduler", "none", "--sweep-name", "ctrl-c", "--storage-path", str(tmp_path),
            "--tracking-uri", mlflow_uri]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "pipelines/tune.py", *argv, "--address", ray_cluster], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                parent = _parent(mlflow_uri, "ctrl-c")
                if any(MlflowClient(mlflow_uri).get_metric_history(c.info.run_id, "epoch_seconds")
                       for c in _children(mlflow_uri, parent.info.run_id)):
                    break
            except (ValueError, AttributeError):
                pass
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out + err)[-3000:]
    parent = _parent(mlflow_uri, "ctrl-c")
    assert "interrupted: sweep 'ctrl-c' stopped" in err
    assert parent.info.status == "KILLED" and parent.data.tags["interrupted"] == "true"
    statuses = [c.info.status for c in _children(mlflow_uri, parent.info.run_id)]
    assert "RUNNING" not in statuses and "KILLED" in statuses, statuses
    assert cli.main([*argv, "--resume"]) == 0
    parent = _parent(mlflow_uri, "ctrl-c")
    children = _children(mlflow_uri, parent.info.run_id)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
