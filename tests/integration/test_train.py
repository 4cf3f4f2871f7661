"""pipelines/train.py on the shared local Ray instance: learning, resume, recovery, bad input, MLflow."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient

from pipelines import train as cli
from tests.conftest import names_in_two_places

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration  # the shared Ray instance, MLflow servers, subprocess entry points


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _states(folder: Path) -> list[dict]:
    """The kept checkpoints' states of one run's folder."""
    return [torch.load(c / "state.pt", weights_only=True) for c in folder.glob("checkpoint_*") if c.is_dir()]


def _run_id(uri: str, name: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("alexnet-ray")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.ray_run_name = '{name}'")
    return run.info.run_id


def test_two_cpu_workers_learn_and_log_everything(learnable, small_args, mlflow_uri, tmp_path, capsys):
    argv = ["--data", str(learnable), "--num-workers", "2", "--epochs", "8", "--run-name", "learns",
            "--storage-path", str(tmp_path / "ckpt"), *small_args, "--eval-10crop-every", "4",
            "--register-model", "alexnet-learns"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    run_id = _run_id(mlflow_uri, "learns")
    assert f"MLflow run id: {run_id}" in out
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["num_workers"] == "2" and run.data.params["init"] == "pytorch"
    assert run.data.tags["data.path"] == str(learnable.resolve())
    assert not names_in_two_places(run)  # e.g. the initial lr is the param lr, each epoch's is train/lr
    val = _history(mlflow_uri, run_id, "val/top1_err")
    assert [s for s, _ in val] == list(range(1, 9))
    assert min(e for _, e in val) < 0.45, val  # chance is 0.75 with 4 classes
    losses = [v for _, v in _history(mlflow_uri, run_id, "train/loss")]
    assert losses[-1] < 0.9 * math.log(4), losses
    for key in ("train/loss", "train/top1_err", "val/top5_err", "train/lr", "images_per_s", "data_wait_frac"):
        assert len(_history(mlflow_uri, run_id, key)) == 8, key
    assert [s for s, _ in _history(mlflow_uri, run_id, "val/top1_err_10crop")] == [4, 8]
    # every val image counted once across the two workers (unequal split, nothing dropped); the count is in
    # each epoch's report (kept with its checkpoint), and neither it nor the epoch is charted as a metric
    states = _states(tmp_path / "ckpt" / "learns")
    assert states and {s["metrics"]["val/images"] for s in states} == {48}
    assert not _history(mlflow_uri, run_id, "val/images") and not _history(mlflow_uri, run_id, "epoch")
    artifacts = {a.path for a in client.list_artifacts(run_id, "train")}
    assert {"train/conv1_kernels.png", "train/learning_curves.png"} <= artifacts
    # the logged model takes any batch size
    import mlflow.pytorch

    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            filter_string=f"source_run_id = '{run_id}'")
    model = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    for n in (1, 3, 5):
        assert tuple(model(torch.zeros(n, 3, 64, 64)).shape) == (n, 4)
    # named for what it is (the run's best epoch), carrying that epoch's metrics, registered as asked
    best_epoch, best_err = min(val, key=lambda e: (e[1], -e[0]))  # of equal errors, the latest epoch
    assert logged.name == f"learns-epoch{best_epoch}"
    linked = {m.key: (m.step, m.value) for m in logged.metrics}
    assert linked["val/top1_err"] == (best_epoch, best_err)
    assert linked["train/loss"] == (best_epoch, dict(_history(mlflow_uri, run_id, "train/loss"))[best_epoch])
    assert run.data.metrics["val/top1_err_best"] == best_err
    assert run.data.tags["registered_model"] == "alexnet-learns/1" and "registered as models:/alexnet-learns/1" in out
    assert client.get_model_version("alexnet-learns", "1").source == f"models:/{logged.model_id}"


def test_resume_continues_at_the_next_epoch_with_the_saved_state(learnable, small_args, mlflow_uri, tmp_path):
    common = ["--data", str(learnable), "--run-name", "resumes", "--storage-path", str(tmp_path / "ckpt"), *small_args]
    assert cli.main([*common, "--epochs", "2"]) == 0
    run_id = _run_id(mlflow_uri, "resumes")
    first = _history(mlflow_uri, run_id, "train/loss")
    assert cli.main([*common, "--epochs", "4"]) == 0
    assert _run_id(mlflow_uri, "resumes") == run_id  # the same MLflow run
    epochs = [s for s, _ in _history(mlflow_uri, run_id, "epoch_seconds")]
    assert epochs == [1, 2, 3, 4]  # epochs 1-2 were not run again
    losses = dict(_history(mlflow_uri, run_id, "train/loss"))
    assert dict(first) == {1: losses[1], 2: losses[2]}
    # a restart from scratch would begin near ln(4); the resumed epoch 3 starts from epoch 2's weights
    assert losses[3] < losses[1]
    ckpts = sorted(c for c in (tmp_path / "ckpt" / "resumes").glob("checkpoint_*") if c.is_dir())
    states = [torch.load(c / "state.pt", weights_only=True) for c in ckpts]
    assert max(s["epoch"] for s in states) == 4
    # the loop restored the schedule it saved: a fresh scheduler in the resumed run would count 2 epochs, not 4
    assert {s["epoch"]: s["scheduler"]["last_epoch"] for s in states}[4] == 4
    # (that momentum and schedule come back exactly: tests/unit/test_checkpoints.py)


def test_a_killed_worker_is_replaced_and_the_run_finishes_all_epochs(learnable, small_args, mlflow_uri, tmp_path):
    storage = tmp_path / "ckpt"
    argv = ["--data", str(learnable), "--num-workers", "2", "--epochs", "5", "--run-name", "recovers",
            "--storage-path", str(storage), "--max-failures", "2", *small_args]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", cli.main(argv)))
    thread.start()
    deadline = time.time() + 240
    while time.time() < deadline and not list((storage / "recovers").glob("checkpoint_2*")):
        time.sleep(0.5)
    assert list((storage / "recovers").glob("checkpoint_2*")), "no checkpoint appeared"
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "no training worker process found"
    workers[0].kill()
    thread.join(timeout=400)
    assert result.get("rc") == 0
    run_id = _run_id(mlflow_uri, "recovers")
    # each epoch logged exactly once: a restart from scratch would log epochs 1-2 again
    assert [s for s, _ in _history(mlflow_uri, run_id, "epoch_seconds")] == [1, 2, 3, 4, 5]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("extra, message", [
    (["--image-size", "100"], "larger than the stored images"),
    (["--gpus-per-worker", "2"], "2 GPU on a single node"),
    (["--num-workers", "16"], "holds at most"),
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
])
def test_requests_that_cannot_work_exit_2_at_once(learnable, small_args, tmp_path, capsys, extra, message):
    argv = ["--data", str(learnable), "--storage-path", str(tmp_path), *small_args, *extra]
    start = time.time()
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert time.time() - start < 30


def test_missing_or_unfinished_data_exits_2(learnable, small_args, tmp_path, capsys):
    assert cli.main(["--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(learnable, unfinished)
    (unfinished / "summary.json").unlink()
    (unfinished / "_work").mkdir()
    assert cli.main(["--data", str(unfinished)]) == 2
    assert "unfinished preprocessing output" in capsys.readouterr().err



@pytest.mark.gpu
def test_one_gpu_per_worker_runs_the_towers_on_it(learnable, small_args, mlflow_uri, tmp_path):
    import torch

    argv = ["--data", str(learnable), "--gpus-per-worker", "1", "--epochs", "1", "--run-name", "gpu1",
            "--storage-path", str(tmp_path), *small_args]
    assert cli.main(argv) == 0
    if torch.cuda.device_count() >= 2:
        assert cli.main([*argv[:-len(small_args)], "--gpus-per-worker", "2", "--run-name", "gpu2", *small_args]) == 0


def test_workers_the_cluster_never_grants_fail_the_run_within_the_bound_saying_what_they_wait_for(
        learnable, small_args, mlflow_uri, tmp_path, capsys, ray_cluster):
    """Another job holds 3 of the 4 CPUs: the run (one 2-CPU worker) would fit an idle cluster, so the
    up-front check passes, but its workers are never granted. It ends after --resource-wait-s, naming
    what it waited for and what the cluster has, instead of waiting for ever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    other_job = placement_group([{"CPU": 3}])
    ray.get(other_job.ready(), timeout=60)
    try:
        argv = ["--data", str(learnable), "--epochs", "1", "--run-name", "starved", "--cpus-per-worker", "2",
                "--resource-wait-s", "8", "--storage-path", str(tmp_path / "ckpt"), *small_args]
        start = time.monotonic()
        assert cli.main(argv) == 2
        took = time.monotonic() - start
    finally:
        remove_placement_group(other_job)
    err = capsys.readouterr().err
    assert ("waited 8 s for 1 worker(s) of 2 CPU and the cluster did not grant them: it has 4 CPU in all, "
            "1 CPU free now") in err, err[-3000:]
    assert "Traceback" not in err
    assert took < 8 + 60, took  # the bound, plus Ray Train's start-up
    run = MlflowClient(mlflow_uri).get_run(_run_id(mlflow_uri, "starved"))
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("waited 8 s for 1 worker(s)")


@pytest.mark.parametrize("damage, message", [
    ("delete", "shard train/part-00000.parquet is listed in summary.json but missing"),
    ("extra", "train/part-99999.parquet is not part of this output (not in summary.json)"),
    ("truncate", "shard train/part-00000.parquet has "),
    ("garble", "shard train/part-00000.parquet is not a readable Parquet file"),
])
def test_shards_that_disagree_with_the_summary_exit_2_naming_the_shard_before_ray_work(
        learnable, small_args, tmp_path, capsys, damage, message):
    """A deleted shard trained silently on less data, a stray one was read, a truncated one ended the run
    with a bare ArrowInvalid: each is now refused before training, naming the shard."""
    data = tmp_path / "data"
    shutil.copytree(learnable, data)
    shard = data / "train" / "part-00000.parquet"
    if damage == "delete":
        shard.unlink()
    elif damage == "extra":
        shutil.copy(shard, data / "train" / "part-99999.parquet")
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:  # same size, other bytes: an interrupted copy, a disk error
        shard.write_bytes(b"x" * shard.stat().st_size)
    start = time.time()
    assert cli.main(["--data", str(data), "--storage-path", str(tmp_path / "ckpt"), *small_args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert time.time() - start < 15
    assert not (tmp_path / "ckpt").exists()


def _damage_jpegs_in_place(shard: Path, rows: list[int]) -> None:
    """Zero the start of some rows' JPEG bytes inside the shard: the file keeps its size and stays readable
    Parquet (bit rot, a bad sector), the images no longer decode."""
    import pyarrow.parquet as pq

    raw = bytearray(shard.read_bytes())
    images = pq.read_table(shard, columns=["image"])["image"].to_pylist()
    for row in rows:
        at = raw.find(images[row])
        assert at > 0
        raw[at:at + 64] = bytes(64)
    shard.write_bytes(bytes(raw))


def test_images_damaged_inside_intact_shards_are_skipped_and_counted_not_a_crash(learnable, small_args, mlflow_uri,
                                                                                tmp_path):
    data = tmp_path / "data"
    shutil.copytree(learnable, data)
    _damage_jpegs_in_place(data / "train" / "part-00000.parquet", [0, 3, 7])
    _damage_jpegs_in_place(sorted((data / "val").glob("*.parquet"))[0], [1])
    argv = ["--data", str(data), "--epochs", "2", "--run-name", "damaged-jpegs", "--storage-path", str(tmp_path / "ckpt"),
            "--num-workers", "2", *small_args, "--batch-size", "40"]  # 2 x 5 x 20 = 200: no row dropped
    assert cli.main(argv) == 0
    run_id = _run_id(mlflow_uri, "damaged-jpegs")
    assert _history(mlflow_uri, run_id, "train/damaged_images") == [(1, 3.0), (2, 3.0)]
    assert _history(mlflow_uri, run_id, "val/damaged_images") == [(1, 1.0), (2, 1.0)]
    states = _states(tmp_path / "ckpt" / "damaged-jpegs")
    assert sorted(s["metrics"]["val/images"] for s in states) == [47, 47]  # 48 stored, 1 damaged
    warning = MlflowClient(mlflow_uri).get_run(run_id).data.tags["warning_damaged_images"]
    assert warning.startswith("epoch 2: stored images that do not decode were skipped (train/damaged_images 3, "
                              "val/damaged_images 1)")


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_readable_one(learnable, small_args, mlflow_uri,
                                                                           tmp_path, capsys):
    storage = tmp_path / "ckpt"
    common = ["--data", str(learnable), "--run-name", "damaged", "--storage-path", str(storage), *small_args]
    assert cli.main([*common, "--epochs", "3"]) == 0
    folders = sorted(c for c in (storage / "damaged").glob("checkpoint_*") if c.is_dir())
    epochs = {torch.load(c / "state.pt", weights_only=True)["epoch"]: c for c in folders}
    assert sorted(epochs) == [1, 2, 3]
    latest = epochs[3] / "state.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # an interrupted upload
    capsys.readouterr()
    assert cli.main([*common, "--epochs", "4"]) == 0
    out = capsys.readouterr().out
    assert f"WARNING: checkpoint(s) {epochs[3]} (" in out and f"resuming from {epochs[2]} (epoch 2)" in out, out
    run_id = _run_id(mlflow_uri, "damaged")
    # the worker resumed after epoch 2, not from scratch and not from the damaged epoch 3
    assert [s for s, _ in _history(mlflow_uri, run_id, "epoch_seconds")] == [1, 2, 3, 3, 4]

    kept = [c for c in (storage / "damaged").glob("checkpoint_*") if c.is_dir()]
    for folder in kept:  # now every kept checkpoint is damaged
        (folder / "state.pt").write_bytes(b"")
    start = time.time()
    assert cli.main([*common, "--epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "error: no readable checkpoint to resume from: " in err and all(str(c) in err for c in kept), err
    assert time.time() - start < 10


def test_ctrl_c_marks_the_run_killed_exits_130_and_the_same_command_resumes_it(learnable, small_args, mlflow_uri,
                                                                              tmp_path, ray_cluster):
    """Measured before: Ctrl-C left the MLflow run RUNNING (and Ray Train's handler exited 0)."""
    argv = ["--data", str(learnable), "--epochs", "4", "--run-name", "interrupted",
            "--storage-path", str(tmp_path / "ckpt"), "--tracking-uri", mlflow_uri, *small_args]
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "train.py"), *argv, "--address", ray_cluster],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if _history(mlflow_uri, _run_id(mlflow_uri, "interrupted"), "epoch_seconds"):
                    break
            except (ValueError, AttributeError):
                pass
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    run_id = _run_id(mlflow_uri, "interrupted")
    assert f"interrupted: MLflow run {run_id} is KILLED" in err
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "KILLED"
    done = [s for s, _ in _history(mlflow_uri, run_id, "epoch_seconds")]
    assert 1 <= len(done) < 4
    assert cli.main(argv) == 0  # the same command resumes it
    assert _run_id(mlflow_uri, "interrupted") == run_id
    assert [s for s, _ in _history(mlflow_uri, run_id, "epoch_seconds")] == [1, 2, 3, 4]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"


def test_input_only_measures_the_input_as_the_model_gets_it_and_trains_nothing(learnable, small_args, mlflow_uri,
                                                                              tmp_path, capsys):
    storage = tmp_path / "ckpt"
    argv = ["--data", str(learnable), "--input-only", "--epochs", "2", "--run-name", "input", "--num-workers", "2",
            "--storage-path", str(storage), *small_args, "--batch-size", "64"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    run_id = _run_id(mlflow_uri, "input")
    assert "input: input only: best epoch " in out and f"MLflow run id: {run_id}" in out
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "input-only"
    # every stored training image reaches a worker once per epoch: 2 workers x (3 x 32 + 4), none dropped where the
    # batches do not divide the 100 rows of each worker
    assert _history(mlflow_uri, run_id, "train/images") == [(1, 200.0), (2, 200.0)]
    assert [s for s, _ in _history(mlflow_uri, run_id, "images_per_s")] == [1, 2]
    assert all(0 <= w <= 1 for _, w in _history(mlflow_uri, run_id, "data_wait_frac"))
    assert all(f >= 0 for _, f in _history(mlflow_uri, run_id, "first_batch_s"))
    assert not _history(mlflow_uri, run_id, "train/loss")  # no model ran
    assert not list(storage.glob("input/checkpoint_*"))
    assert not client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run_id}'")
    assert run.data.params["input_until"] == "model"
    # the uint8 crops on the worker's device, without the device-side normalisation: every image, once an epoch
    crops_argv = [*argv, "--input-until", "crops"]
    crops_argv[argv.index("--epochs") + 1], crops_argv[argv.index("--run-name") + 1] = "1", "input-crops"
    assert cli.main(crops_argv) == 0
    crops_id = _run_id(mlflow_uri, "input-crops")
    assert client.get_run(crops_id).data.params["input_until"] == "crops"
    assert _history(mlflow_uri, crops_id, "train/images") == [(1, 200.0)]


def test_the_console_shows_the_projects_lines_and_verbose_brings_rays_back(learnable, small_args, mlflow_uri,
                                                                            tmp_path, ray_cluster):
    """Two members of two epochs each, through the real entry point: measured before, 75 lines of which ~15 were
    the project's (Ray's INFO lines, deprecation warnings, TrainingReport dumps)."""
    def run(*extra: str) -> list[str]:
        argv = ["--data", str(learnable), "--storage-path", str(tmp_path / "ckpt"), "--tracking-uri", mlflow_uri,
                *small_args, *extra, "--address", ray_cluster]
        done = subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), *argv], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:]
        return done.stdout.splitlines()

    lines = run("--seeds", "2", "--epochs", "2", "--run-name", "console")
    assert len(lines) <= 30, "\n".join(lines)
    epochs = [line for line in lines if line.startswith("epoch ")]  # said in the controller, printed by the driver
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2", "1/2", "2/2"], "\n".join(lines)
    assert not [line for line in lines if "pid=" in line or " INFO " in line or "Warning" in line], "\n".join(lines)
    log_file = lines[0].split("logs of Ray and MLflow: ")[1].split(";")[0]
    assert Path(log_file).is_file()

    verbose = run("--epochs", "1", "--run-name", "console-verbose", "--verbose")
    assert any("(TrainController pid=" in line for line in verbose), "\n".join(verbose)  # Ray's output is back
    assert [line for line in verbose if line.startswith("epoch ") or ") epoch " in line]
