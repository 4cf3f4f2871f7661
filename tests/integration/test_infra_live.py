"""infra/ proved on one machine: a two-node Ray cluster started with `ray start`, and a real
`mlflow server` started by infra/mlflow/serve.sh."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import psutil
import pytest
import torch
from mlflow import MlflowClient

from pipelines import train as train_cli

pytestmark = pytest.mark.integration  # the shared Ray instance, MLflow servers, subprocess entry points

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a process started in its own session and everything it started."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=5)  # a test cluster: no need for a graceful drain
    for p in alive:
        p.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers that re-parented out of the tree
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for(check, what: str, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(f"gave up waiting for {what}")


# ------------------------------------------------------------- two Ray nodes on one machine


_WORKER_PORTS = itertools.count(24000, 500)  # each node's worker ports: its own range, never reused


def _node_ports() -> list[str]:
    p = _free_ports(6)
    low = next(_WORKER_PORTS)
    return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
            "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
            "--metrics-export-port", str(p[4]), "--runtime-env-agent-port", str(p[5]),
            "--min-worker-port", str(low), "--max-worker-port", str(low + 499)]


@contextlib.contextmanager
def _ray_start_cluster(nodes: int, cpus: int):
    """`ray start --head` plus `ray start --address` nodes with their own ports and `cpus` each; all
    stopped after. Yields the cluster's facts and `add_node()`, which starts one more node."""
    temp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    gcs, dash, client = _free_ports(3)
    # RAY_TMPDIR: this cluster's temp dir is Ray's default one for every process given this env, so
    # a driver started with it finds the cluster as on a node where `ray start` runs; PATH: the
    # job entrypoint's `python` is this environment's, as in the project's image
    # token authentication on (conftest): the cluster, the drivers and the Jobs API client share the token
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=temp,
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", str(cpus), "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    dashboard = f"http://127.0.0.1:{dash}"
    procs: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        # the new node's id, not a count: a killed node the GCS marks dead meanwhile must not hide it
        before = set(_alive_nodes(dashboard)) if procs else set()
        proc = subprocess.Popen([str(BIN / "ray"), "start", *args, *common, *_node_ports()], env=env,
                                start_new_session=True, stdout=open(f"{temp}/node{len(procs)}.log", "w"),
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        _wait_for(lambda: set(_alive_nodes(dashboard)) - before, f"node {len(procs)}")
        return proc

    try:
        start(["--head", "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dash), "--ray-client-server-port", str(client), "--temp-dir", f"{temp}/ray"])
        for _ in range(nodes - 1):
            start(["--address", f"127.0.0.1:{gcs}"])
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": dashboard, "nodes": _alive_nodes(dashboard), "env": env,
               "procs": procs, "add_node": lambda: start(["--address", f"127.0.0.1:{gcs}"])}
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="module")
def two_node_cluster():
    """Two nodes of 1 CPU each."""
    with _ray_start_cluster(nodes=2, cpus=1) as cluster:
        yield cluster


def _authorized(url: str) -> urllib.request.Request:
    """A dashboard request carrying the session's Ray token (the dashboard refuses any other)."""
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})


def _alive_nodes(dashboard: str) -> list[str]:
    """Node ids of the cluster's alive nodes, from its dashboard's state API."""
    try:
        with urllib.request.urlopen(_authorized(f"{dashboard}/api/v0/nodes?limit=100"), timeout=5) as resp:
            body = json.load(resp)
    except OSError:
        return []
    return sorted(n["node_id"] for n in body["data"]["result"]["result"] if n["state"] == "ALIVE")


# the host may be spelled as the node's IP (as `ray start` records it) or 127.0.0.1: the port names the cluster
_JOINED = r"Ray: joined the cluster at [0-9.]+:{port}: 2 node\(s\), 2 CPU, 0 GPU"


def _check_written_on_both_nodes(out: Path, made: dict, cluster: dict) -> None:
    summary = json.loads((out / "summary.json").read_text())
    # the shards were written by tasks on both nodes of this cluster, and by no other node
    assert sorted(summary["shards_per_node"]) == cluster["nodes"]
    assert sum(summary["shards_per_node"].values()) == sum(summary["shards"].values())
    # the output is complete: every valid file became a row
    for split in ("train", "val"):
        broken = sum(1 for p in made["broken"] if p.startswith(f"{split}/"))
        assert summary["rows_written"][split] == made[split] - broken
    assert len(list((out / "train").glob("*.parquet"))) == summary["shards"]["train"]
    assert (out / "mean_image.npy").is_file() and (out / "pca.json").is_file()


def test_preprocess_with_address_runs_on_both_nodes(two_node_cluster, sample_tree, tmp_path):
    root, made = sample_tree
    out = tmp_path / "prepared"
    cmd = [sys.executable, str(ROOT / "pipelines" / "preprocess.py"), "--input", str(root), "--output", str(out),
           "--size", "48", "--address", two_node_cluster["address"],
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(cmd, env=two_node_cluster["env"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 node(s)" in done.stdout
    _check_written_on_both_nodes(out, made, two_node_cluster)

    # Ray's own record agrees: the cluster ran tasks on both nodes
    with urllib.request.urlopen(_authorized(f"{two_node_cluster['dashboard']}/api/v0/tasks?limit=10000&detail=1"),
                                timeout=30) as resp:
        tasks = json.load(resp)["data"]["result"]["result"]
    task_nodes = {t["node_id"] for t in tasks if t.get("state") == "FINISHED" and t.get("node_id")}
    assert task_nodes == set(two_node_cluster["nodes"])


def test_a_driver_without_address_joins_the_cluster_ray_start_runs_on_its_node(two_node_cluster, sample_tree,
                                                                               tmp_path):
    root, made = sample_tree
    out = tmp_path / "prepared"
    cmd = [sys.executable, str(ROOT / "pipelines" / "preprocess.py"), "--input", str(root), "--output", str(out),
           "--size", "48", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(cmd, env=two_node_cluster["env"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(_JOINED.format(port=two_node_cluster["address"].split(":")[1]), done.stdout), done.stdout
    _check_written_on_both_nodes(out, made, two_node_cluster)


def test_the_cluster_refuses_a_driver_without_its_token_and_the_driver_says_how_to_give_it(two_node_cluster,
                                                                                         sample_tree, tmp_path):
    """A new user's shell: no RAY_AUTH_MODE, no token file in ~/.ray; one line, exit 2, instead of a
    bare "Failed to connect to Ray cluster"; the dashboard refuses a request without the token too."""
    env = {k: v for k, v in two_node_cluster["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)
    cmd = [sys.executable, str(ROOT / "pipelines" / "preprocess.py"), "--input", str(sample_tree[0]),
           "--output", str(tmp_path / "out"), "--address", two_node_cluster["address"],
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert f"the Ray cluster at {two_node_cluster['address']} uses token authentication: set RAY_AUTH_MODE=token" \
        in line and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not list(tmp_path.rglob("*.parquet"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{two_node_cluster['dashboard']}/api/v0/nodes?limit=1", timeout=5)
    assert refused.value.code in (401, 403)


def _start_job(cluster: dict, manifest: str, paths: dict[str, str], drop: tuple[str, ...] = (), add: str = ""):
    """A RayJob manifest's entrypoint, verbatim but for `paths` (and flags dropped or added), submitted to
    the cluster's Jobs API as KubeRay submits it; (client, job id)."""
    import yaml
    from ray.job_submission import JobSubmissionClient

    (job,) = [d for d in yaml.safe_load_all((ROOT / "infra" / "kuberay" / manifest).read_text()) if d]
    entrypoint = job["spec"]["entrypoint"]
    for old, new in {"/opt/alexnet-ray": str(ROOT), **paths}.items():
        assert old in entrypoint, (old, entrypoint)
        entrypoint = entrypoint.replace(old, new)
    for flag in drop:
        assert f" {flag}" in entrypoint
        entrypoint = entrypoint.replace(f" {flag}", "")
    client = JobSubmissionClient(cluster["dashboard"])
    return client, client.submit_job(entrypoint=f"{entrypoint} {add}".strip())


def _submit(cluster: dict, manifest: str, paths: dict[str, str], drop: tuple[str, ...] = (), add: str = ""):
    """`_start_job`, then wait for the end: (final status, the job's logs)."""
    client, job_id = _start_job(cluster, manifest, paths, drop, add)
    status = _wait_for(lambda: (st := client.get_job_status(job_id)).is_terminal() and st, "the job", timeout_s=600)
    return status, client.get_job_logs(job_id)


def test_the_preprocessing_rayjob_entrypoint_as_written_runs_through_job_submission(two_node_cluster, sample_tree,
                                                                                    tmp_path):
    """What KubeRay does with infra/kuberay/rayjob-preprocess.yaml: the entrypoint, verbatim but for its
    paths, submitted to the cluster's Jobs API (which sets RAY_ADDRESS for the driver)."""
    from ray.job_submission import JobStatus

    root, made = sample_tree
    out = tmp_path / "prepared"
    status, logs = _submit(two_node_cluster, "rayjob-preprocess.yaml", {
        "/mnt/shared/imagenet": str(root), "/mnt/shared/prepared": str(out),
        "http://mlflow:5000": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert re.search(_JOINED.format(port=two_node_cluster["address"].split(":")[1]), logs), logs[-3000:]
    _check_written_on_both_nodes(out, made, two_node_cluster)


# ------------------------------------------------------------- a real MLflow tracking server


@contextlib.contextmanager
def _serve(work: Path, port: int | None = None, **extra: str):
    """infra/mlflow/serve.sh with its defaults but a free port and a temporary store (plus `extra` env);
    the same `work` and `port` again: the same server restarted."""
    port = port or _free_ports(1)[0]
    env = dict(os.environ, MLFLOW_PORT=str(port), MLFLOW=str(BIN / "mlflow"), MLFLOW_WORKERS="1",
               MLFLOW_BACKEND_STORE_URI=f"sqlite:///{work / 'server.db'}",
               MLFLOW_ARTIFACTS_DESTINATION=str(work / "artifacts"), **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([str(ROOT / "infra" / "mlflow" / "serve.sh")], env=env, cwd=work,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(work / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        _wait_for(healthy, "the MLflow server", timeout_s=120)
        yield {"url": url, "pid": proc.pid, "port": port, "artifacts": work / "artifacts",
               "backend": env["MLFLOW_BACKEND_STORE_URI"]}
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with _serve(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


def test_a_server_with_basic_auth_refuses_a_driver_without_an_account_before_any_ray_work(
        tmp_path, prepared, small_args, capsys, monkeypatch):
    """serve.sh with MLFLOW_AUTH=basic: /health answers everyone, so only an authenticated request tells
    whether the runs would be refused; missing or wrong credentials are one line and exit 2."""
    from alexnet.tracking import check_tracking_uri

    password = os.urandom(12).hex()
    with _serve(tmp_path, MLFLOW_AUTH="basic", MLFLOW_AUTH_ADMIN_PASSWORD=password,
                MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex()) as server:
        url = server["url"]
        for creds in ({}, {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"}):
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                monkeypatch.delenv(k, raising=False)
            for k, v in creds.items():
                monkeypatch.setenv(k, v)
            start = time.monotonic()
            assert train_cli.main(["--data", str(prepared[0]), "--tracking-uri", url,
                                   "--storage-path", str(tmp_path / "ckpt"), *small_args]) == 2
            err = capsys.readouterr().err
            assert f"error: MLflow tracking server {url} requires authentication: set MLFLOW_TRACKING_USERNAME" in err
            assert time.monotonic() - start < 15 and not (tmp_path / "ckpt").exists()
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        check_tracking_uri(url)  # the admin's account passes


def test_mlflow_server_listens_on_loopback_only_by_default(mlflow_server):
    tree = [psutil.Process(mlflow_server["pid"]), *psutil.Process(mlflow_server["pid"]).children(recursive=True)]
    listening = {c.laddr for p in tree for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == mlflow_server["port"]}
    log = (mlflow_server["artifacts"].parent / "server.log").read_text()[-2000:]
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}, (listening, log)


def test_no_server_process_shows_the_backend_store_uri_in_its_argv(mlflow_server):
    """The URI may hold the database password: every user can read a process's argv (`ps`)."""
    tree = [psutil.Process(mlflow_server["pid"]), *psutil.Process(mlflow_server["pid"]).children(recursive=True)]
    argvs = [" ".join(p.cmdline()) for p in tree]
    assert len(argvs) >= 2 and any("mlflow" in a for a in argvs), argvs  # the server and its workers
    db = mlflow_server["backend"].removeprefix("sqlite:///")
    assert not [a for a in argvs if db in a], argvs


def test_training_run_lands_on_the_tracking_server(mlflow_server, prepared, small_args, mlflow_uri, tmp_path, capsys):
    try:
        _train_against(mlflow_server, prepared, small_args, tmp_path, capsys)
    finally:
        # mlflow.set_tracking_uri (called by the run) also sets $MLFLOW_TRACKING_URI: point both back at
        # the session's store, or later tests would log to this server after it stops
        mlflow.set_tracking_uri(mlflow_uri)


def _train_against(mlflow_server, prepared, small_args, tmp_path, capsys) -> None:
    url = mlflow_server["url"]
    argv = ["--data", str(prepared[0]), "--epochs", "1", "--run-name", "to-server", "--tracking-uri", url,
            "--storage-path", str(tmp_path / "ckpt"), "--experiment", "server-test", *small_args]
    assert train_cli.main(argv) == 0
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert f"MLflow run id: {run.info.run_id}" in capsys.readouterr().out
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.005" and run.data.params["width"] == "0.25"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1_err")] == [1]
    # artifacts travel through the server (--serve-artifacts) into its artifact destination
    assert {a.path for a in client.list_artifacts(run.info.run_id, "train")} >= {"train/learning_curves.png"}
    assert any(mlflow_server["artifacts"].rglob("learning_curves.png"))
    # the model: a LoggedModel on the server that loads back through it and takes any batch size
    (model,) = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert model.source_run_id == run.info.run_id
    mlflow.set_tracking_uri(url)
    net = mlflow.pytorch.load_model(f"models:/{model.model_id}")
    with torch.no_grad():
        logits = net(torch.zeros(3, 3, 64, 64))
    assert logits.shape == (3, prepared[1]["num_classes"]) and np.isfinite(logits.numpy()).all()


def _kill_server(server: dict) -> None:
    os.killpg(server["pid"], signal.SIGKILL)  # serve.sh runs in its own session: its group is the server
    _wait_for(lambda: psutil.Process(server["pid"]).status() == psutil.STATUS_ZOMBIE
              if psutil.pid_exists(server["pid"]) else True, "the server to die", timeout_s=30)


def test_writes_kept_while_the_server_is_away_are_sent_in_order_when_it_answers(tmp_path, monkeypatch):
    from alexnet.outbox import PENDING_FILE, Outbox
    from alexnet.tracking import Runs

    work, folder, lines = tmp_path / "store", str(tmp_path / "run"), []
    work.mkdir()
    with _serve(work) as server:
        runs = Runs(server["url"])
        run_id = runs.create(runs.experiment_id("outbox"), "kept")
        outbox = Outbox(runs, run_id, folder, lines.append)
        assert outbox.write({"op": "metrics", "step": 1, "metrics": {"x": 1.0}, "ms": 1})
        _kill_server(server)
        start = time.monotonic()
        for step in (2, 3):
            assert not outbox.write({"op": "metrics", "step": step, "metrics": {"x": float(step)}, "ms": step})
        assert time.monotonic() - start < 30  # kept after a few quick retries, not MLflow's minutes of them
        assert Path(folder, PENDING_FILE).exists() and len(outbox.ops) == 2
        assert len([line for line in lines if line.startswith("WARNING: MLflow tracking store")]) == 1
        port = server["port"]
    with _serve(work, port=port) as server:
        assert outbox.write({"op": "metrics", "step": 4, "metrics": {"x": 4.0}, "ms": 4})
        history = MlflowClient(server["url"]).get_metric_history(run_id, "x")
        assert [(m.step, m.value, m.timestamp) for m in history] == [(s, float(s), s) for s in (1, 2, 3, 4)]
        assert not Path(folder, PENDING_FILE).exists()
        assert lines[-1].endswith("answers again: 3 kept write(s) sent")


def test_training_finishes_while_the_tracking_server_is_away_and_the_command_it_prints_sends_the_rest(
        tmp_path, learnable, small_args, mlflow_uri, capsys):
    """Measured before: the reporter's error ended the run at once ("Training failed due to controller error:
    ... Max retries exceeded"), whatever --max-failures said, and the run stayed RUNNING."""
    work, storage = tmp_path / "store", tmp_path / "ckpt"
    work.mkdir()
    try:
        with _serve(work) as server:
            url, port = server["url"], server["port"]
            argv = ["--data", str(learnable), "--epochs", "5", "--run-name", "away", "--tracking-uri", url,
                    "--storage-path", str(storage), "--experiment", "away", *small_args]
            result = {}
            thread = threading.Thread(target=lambda: result.setdefault("rc", train_cli.main(argv)))
            thread.start()
            client = MlflowClient(url)

            def first_epoch_logged():
                exp = client.get_experiment_by_name("away")
                found = exp and client.search_runs([exp.experiment_id])
                return found and client.get_metric_history(found[0].info.run_id, "epoch_seconds") and found[0].info.run_id

            run_id = _wait_for(first_epoch_logged, "epoch 1 in MLflow", timeout_s=240)
            _kill_server(server)
            thread.join(timeout=400)
        out, err = capsys.readouterr()
        assert result.get("rc") == 3, err[-3000:]
        assert "WARNING: MLflow tracking store" in out and "training goes on" in out
        command = f"python -m alexnet.outbox {storage / 'away'}"
        assert f"error: MLflow tracking store {url} is still failing" in err and command in err
        kept = json.loads((storage / "away" / "mlflow_pending.json").read_text())
        assert [op["op"] for op in kept["ops"]][-2:] == ["final", "finish"]
        assert {op["step"] for op in kept["ops"] if op["op"] == "metrics"} >= {5}
        with _serve(work, port=port):
            sent = subprocess.run([sys.executable, "-m", "alexnet.outbox", str(storage / "away")], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert sent.returncode == 0, sent.stderr[-3000:]
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(run_id, "epoch_seconds")] == [1, 2, 3, 4, 5]
            assert [m.step for m in client.get_metric_history(run_id, "val/top1_err")] == [1, 2, 3, 4, 5]
            assert {a.path for a in client.list_artifacts(run_id, "train")} >= {"train/learning_curves.png"}
            (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
            assert model.source_run_id == run_id and run.data.tags["model_uri"] == f"models:/{model.model_id}"
        assert not (storage / "away" / "mlflow_pending.json").exists()
    finally:
        mlflow.set_tracking_uri(mlflow_uri)


def test_a_sweep_finishes_while_the_tracking_server_is_away_and_nothing_is_lost(tmp_path, learnable, small_args,
                                                                                mlflow_uri, capsys):
    """Trial 1 loses the server after its first epoch, trial 2 starts without it (its run's creation is kept
    too); the sweep finishes, exits 3 naming the command, and that command leaves MLflow complete."""
    from pipelines import tune as tune_cli

    work, storage = tmp_path / "store", tmp_path / "sweeps"
    work.mkdir()
    (tmp_path / "space.yaml").write_text("lr: {grid: [0.005, 0.004]}\n")
    try:
        with _serve(work) as server:
            url, port = server["url"], server["port"]
            argv = ["--data", str(learnable), *small_args, "--epochs", "3", "--num-samples", "1", "--search", "grid",
                    "--space", str(tmp_path / "space.yaml"), "--scheduler", "none", "--max-concurrent", "1",
                    "--sweep-name", "away", "--storage-path", str(storage), "--tracking-uri", url,
                    "--experiment", "sweep-away"]
            result = {}
            thread = threading.Thread(target=lambda: result.setdefault("rc", tune_cli.main(argv)))
            thread.start()
            client = MlflowClient(url)

            def first_epoch_logged():
                exp = client.get_experiment_by_name("sweep-away")
                trials = exp and client.search_runs([exp.experiment_id], "tags.stage = 'tune-trial'")
                return trials and client.get_metric_history(trials[0].info.run_id, "epoch_seconds")

            _wait_for(first_epoch_logged, "a trial's epoch 1 in MLflow", timeout_s=240)
            _kill_server(server)
            thread.join(timeout=600)
        out, err = capsys.readouterr()
        assert result.get("rc") == 3, err[-3000:]
        assert out.count("| ok |") == 2 and "| failed |" not in out
        command = re.search(r"python -m alexnet\.outbox (.+)$", err, re.M)
        assert command, err[-2000:]
        folders = command.group(1).split()
        assert f"{storage}/away/mlflow/parent" in folders and len(folders) == 3  # the parent and both trials
        with _serve(work, port=port):
            sent = subprocess.run([sys.executable, "-m", "alexnet.outbox", *folders], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert sent.returncode == 0, sent.stderr[-3000:]
            exp = client.get_experiment_by_name("sweep-away").experiment_id
            (parent,) = client.search_runs([exp], "tags.stage = 'tune'")
            assert parent.info.status == "FINISHED" and parent.data.tags["failed_trials"] == "0"
            assert "tune/sweep_summary.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
            trials = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
            assert sorted(float(t.data.params["lr"]) for t in trials) == [0.004, 0.005]
            for t in trials:
                assert t.info.status == "FINISHED"
                assert [m.step for m in client.get_metric_history(t.info.run_id, "epoch_seconds")] == [1, 2, 3]
    finally:
        mlflow.set_tracking_uri(mlflow_uri)


def test_the_training_rayjob_on_a_cluster_without_gpus_fails_at_once_naming_them(two_node_cluster, prepared,
                                                                                 tmp_path):
    """rayjob-train.yaml's entrypoint (two GPUs per worker) without --no-check-resources, on this GPU-less
    cluster: it joins the cluster, then stops before any training with the reason, instead of waiting."""
    from ray.job_submission import JobStatus

    start = time.monotonic()
    status, logs = _submit(two_node_cluster, "rayjob-train.yaml", {
        "/mnt/shared/prepared": str(prepared[0]), "/mnt/shared/ray_results": str(tmp_path / "ray_results"),
        "http://mlflow:5000": f"sqlite:///{tmp_path / 'mlflow.db'}"}, drop=("--no-check-resources",),
        add="--image-size 64")  # the test data is stored at 72 px, below the paper's 224 px crops
    assert status == JobStatus.FAILED, logs[-3000:]
    assert re.search(_JOINED.format(port=two_node_cluster["address"].split(":")[1]), logs), logs[-3000:]
    assert ("error: one worker needs 4 CPU, 2 GPU on a single node, but the largest node of this cluster has "
            "1 CPU, 0 GPU (nodes: 2)") in logs
    assert time.monotonic() - start < 120


# ------------------------------------------------------------- training over nodes, and a lost node


def _state(cluster: dict, what: str) -> list[dict]:
    with urllib.request.urlopen(_authorized(f"{cluster['dashboard']}/api/v0/{what}?limit=10000&detail=1"),
                                timeout=30) as resp:
        return json.load(resp)["data"]["result"]["result"]


def _kill_node(proc: subprocess.Popen) -> None:
    """A node lost at once, as a spot instance is: SIGKILL to its raylet, workers and everything else."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_a_cpu_training_job_spans_two_nodes_and_survives_losing_one(learnable, small_args, tmp_path):
    """rayjob-train.yaml's entrypoint, CPU-sized, through the Jobs API on two 3-CPU nodes: its two 2-CPU
    workers land one per node. After epoch 2 the second node dies (SIGKILL, mid-epoch 3); a new node
    joins; Ray Train restarts the group from the epoch-2 checkpoint and the run finishes, every epoch
    logged exactly once."""
    from ray.job_submission import JobStatus

    db = tmp_path / "mlflow.db"
    storage = tmp_path / "ray_results"  # one folder every node of this machine sees
    with _ray_start_cluster(nodes=2, cpus=3) as cluster:
        client, job_id = _start_job(cluster, "rayjob-train.yaml", {
            "/mnt/shared/prepared": str(learnable), "/mnt/shared/ray_results": str(storage),
            "http://mlflow:5000": f"sqlite:///{db}"}, drop=("--no-check-resources",),
            add=" ".join([*small_args, "--num-workers", "2", "--gpus-per-worker", "0", "--cpus-per-worker", "2",
                          "--epochs", "4", "--max-failures", "2", "--resource-wait-s", "300"]))
        uri = f"sqlite:///{db}"

        def epochs_done() -> list[tuple[int, float]]:
            if client.get_job_status(job_id).is_terminal():
                raise AssertionError(client.get_job_logs(job_id)[-3000:])
            try:
                return _history(uri, "train/loss")
            except Exception:  # noqa: BLE001 - no experiment or run yet, or the store is being created
                return []

        before = _wait_for(lambda: len(h := epochs_done()) >= 2 and h, "epoch 2", timeout_s=400)
        (head, lost) = cluster["procs"]
        workers = [a for a in _state(cluster, "actors") if "RayTrainWorker" in a["class_name"] and a["state"] == "ALIVE"]
        assert len({a["node_id"] for a in workers}) == 2, workers  # one worker on each node
        _kill_node(lost)
        time.sleep(10)  # the run notices; its restart waits for capacity
        cluster["add_node"]()
        status = _wait_for(lambda: (st := client.get_job_status(job_id)).is_terminal() and st, "the job",
                           timeout_s=600)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        new_node = (set(_alive_nodes(cluster["dashboard"])) - set(cluster["nodes"])).pop()
        ran_on = {a["node_id"] for a in _state(cluster, "actors") if "RayTrainWorker" in a["class_name"]}
        assert new_node in ran_on and set(cluster["nodes"]) <= ran_on  # the restarted group used the new node

    after = _history(uri, "train/loss")
    assert [step for step, _ in after] == [1, 2, 3, 4]  # each epoch once: epochs 1-2 were not run again
    assert after[:2] == before[:2]
    assert [s for s, _ in _history(uri, "epoch_seconds")] == [1, 2, 3, 4]
    assert MlflowClient(uri).search_runs(MlflowClient(uri).get_experiment_by_name("alexnet-ray").experiment_id
                                         )[0].info.status == "FINISHED"


def _history(uri: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("alexnet-ray").experiment_id])
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
