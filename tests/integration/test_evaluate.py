"""pipelines/evaluate.py on tiny members trained by `pipelines/train.py --seeds 3`; fine-tuning with --init-from."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from alexnet.augment import Normalizer, decode_images, eval_views
from alexnet.config import PreprocessConfig
from alexnet.checkpoints import checkpoint_of_run, model_from_state, read_state
from alexnet.ensemble import topk_errors
from alexnet.inference import output_folder, table_arrays
from tests.conftest import names_in_two_places
from alexnet.members import member_from_run
from alexnet.prepared import read_prepared
from pipelines import evaluate as eval_cli
from pipelines import train as train_cli
from tests.conftest import SMALL_TRAIN_ARGS

pytestmark = pytest.mark.integration  # the shared Ray instance, MLflow servers, subprocess entry points

EXPERIMENT = "members-test"


@pytest.fixture(scope="module")
def trio_argv(learnable, tmp_path_factory) -> list[str]:
    storage = tmp_path_factory.mktemp("members")
    return ["--data", str(learnable), "--seeds", "3", "--seed", "10", "--epochs", "2", "--run-name", "trio",
            "--experiment", EXPERIMENT, "--storage-path", str(storage), *SMALL_TRAIN_ARGS]


@pytest.fixture(scope="module")
def members(trio_argv, mlflow_uri) -> list[str]:
    """Three 2-epoch members alike but for their seeds: run ids in seed order."""
    assert train_cli.main(trio_argv) == 0
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.ensemble_group = 'trio'")
    runs = sorted(runs, key=lambda r: int(r.data.params["seed"]))
    assert [r.data.params["seed"] for r in runs] == ["10", "11", "12"]
    assert [r.data.tags["mlflow.runName"] for r in runs] == ["trio-seed10", "trio-seed11", "trio-seed12"]
    assert {r.data.tags["ensemble_members"] for r in runs} == {"3"}
    return [r.info.run_id for r in runs]


def _eval_runs(uri: str, parent_id: str) -> dict[tuple[int, str], object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ensembles")
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {(int(r.data.params["ensemble_size"]), r.data.params["crops"]): r for r in children}


def _folder(uri: str, run_id: str, prepared) -> str:
    return output_folder(prepared, member_from_run(MlflowClient(uri).get_run(run_id), prepared))


def _stored(uri: str, run_id: str, folder: str, mode: str, tmp: Path):
    path = MlflowClient(uri).download_artifacts(run_id, f"{folder}/softmax-{mode}.parquet", str(tmp))
    return table_arrays(pq.read_table(path))


def test_ensembles_equal_numpy_averaging_of_the_stored_outputs(members, learnable, mlflow_uri, tmp_path, capsys):
    argv = ["--data", str(learnable), "--experiment", EXPERIMENT, "--filter", "tags.ensemble_group = 'trio'",
            "--sizes", "1", "2", "3", "--crops", "both", "--figure4", "2", "--run-name", "eval-trio"]
    assert eval_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("inference (center, 10crop)") == 3 and "| 3 CNNs | 10crop |" in out
    client = MlflowClient(mlflow_uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("ensembles").experiment_id],
                                   filter_string="tags.mlflow.runName = 'eval-trio'")
    assert f"MLflow run id: {parent.info.run_id}" in out
    runs = _eval_runs(mlflow_uri, parent.info.run_id)
    assert set(runs) == {(k, c) for k in (1, 2, 3) for c in ("center", "10crop")}

    # an independent numpy averaging of the stored per-member outputs gives the logged numbers
    prepared = read_prepared(learnable)
    for mode in ("center", "10crop"):
        stored = {r: _stored(mlflow_uri, r, _folder(mlflow_uri, r, prepared), mode, tmp_path / mode / r)
                  for r in members}
        paths, labels, _ = stored[members[0]]
        assert len(paths) == 48 and list(paths) == sorted(paths)  # every val image, once, in path order
        for size, key in ((3, "all"), (2, "pair")):
            run = runs[(size, mode)]
            chosen = run.data.tags["members"].split(",")
            assert len(chosen) == size and set(chosen) <= set(members)
            mean = np.mean([stored[r][2] for r in chosen], axis=0)
            hits = np.argsort(-mean, 1)[:, :4] == labels[:, None]
            assert run.data.metrics["val/top1_err"] == pytest.approx(1 - hits[:, 0].mean(), abs=1e-6)  # logged rounded to 6 digits
            assert run.data.metrics["val/top5_err"] == pytest.approx(1 - hits.any(1).mean(), abs=1e-6)
            assert run.data.params == {"ensemble_size": str(size), "crops": mode, "pretrained_members": "0"}
            assert not names_in_two_places(run)  # one name, one place
            assert run.data.metrics["val/top1_gain_over_single"] == pytest.approx(
                np.mean([topk_errors(stored[r][2], labels)[0] for r in chosen]) - run.data.metrics["val/top1_err"],
                abs=2e-6)
        alone = [topk_errors(stored[r][2], labels)[0] for r in members]
        single = runs[(1, mode)].data.metrics
        assert single["val/top1_err"] == pytest.approx(np.mean(alone), abs=1e-6)
        assert single["val/top1_err_best"] == pytest.approx(min(alone), abs=1e-6)
        # the stored softmax is the model's own: recompute one member's centre outputs in-process
        if mode == "center":
            _check_against_the_model(members[0], prepared, stored[members[0]])

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluate")}
    assert {f"evaluate/{n}" for n in ("ensembles.md", "ensembles.html", "ensembles.png", "ensembles.json",
                                     "figure4_neighbours.png", "figure4_neighbours.json")} <= artifacts
    table = (Path(client.download_artifacts(parent.info.run_id, "evaluate/ensembles.md", str(tmp_path)))).read_text()
    assert "| 38.1 | 16.4 |" not in table and "| 40.7 | 18.2 |" in table  # no 5-CNN row; 1-CNN row has the paper's
    # the paper's numbers sit beside the 10-patch row only, also as metrics of that nested run
    assert table.count("| 40.7 | 18.2 |") == 1 and "| 1 CNN | center |" in table
    assert runs[(1, "10crop")].data.metrics["paper/top1_err"] == pytest.approx(0.407)
    assert "paper/top1_err" not in runs[(1, "center")].data.metrics
    assert parent.data.tags["mlflow.note.content"].startswith("## Ensembles vs the paper's Table 2")
    assert "| 3 CNNs | 10crop |" in parent.data.tags["mlflow.note.content"]
    assert "largest/10crop/top1_err" in parent.data.metrics
    assert not names_in_two_places(parent) and parent.data.params["member_count"] == "3"
    assert "/#/compare-runs?runs=[" in out and parent.info.run_id in out
    page = Path(client.download_artifacts(parent.info.run_id, "evaluate/ensembles.html", str(tmp_path))).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<meta charset='utf-8'>" in page
    _check_figure4(parent, prepared, client, tmp_path)


def _fc7_and_probs(run_id: str, prepared, images: np.ndarray):
    state = read_state(checkpoint_of_run(os.environ["MLFLOW_TRACKING_URI"], run_id))  # the session's store
    model = model_from_state(state, prepared.num_classes)
    crop = model.cfg.image_size
    (top, left, flip), = eval_views(prepared.size, crop, "center")
    x = Normalizer(prepared.mean_image, torch.device("cpu")).view(torch.from_numpy(images), top, left, flip, crop)
    with torch.no_grad():
        return model.fc7_features(x).numpy(), model(x).softmax(1).numpy()


def _decoded(files: list[str]):
    table = pq.read_table(files, columns=["path", "image"]).sort_by("path")
    images = decode_images(table["image"].to_pylist())
    return np.asarray(table["path"].to_pylist()), images


def _check_against_the_model(run_id: str, prepared, stored) -> None:
    paths, images = _decoded(prepared.val_files)
    _, probs = _fc7_and_probs(run_id, prepared, images)
    assert list(paths) == list(stored[0])
    np.testing.assert_allclose(stored[2], probs, atol=1e-5)


def _check_figure4(parent, prepared, client, tmp_path) -> None:
    """The six neighbours of each query are the six nearest training images in fc7, recomputed here."""
    rows = json.loads(Path(client.download_artifacts(parent.info.run_id, "evaluate/figure4_neighbours.json",
                                                     str(tmp_path / "f4"))).read_text())
    assert len(rows) == 2 and all(len(r["neighbours"]) == 6 for r in rows)
    member = parent.data.tags["figure4_member"]
    train_paths, train_images = _decoded(prepared.train_files)
    val_paths, val_images = _decoded(prepared.val_files)
    train_fc7, _ = _fc7_and_probs(member, prepared, train_images)
    queries = [list(val_paths).index(r["query"]) for r in rows]
    val_fc7, val_probs = _fc7_and_probs(member, prepared, val_images[queries])
    names = prepared.class_names()
    for row, p in zip(rows, val_probs):  # the left panel: the member's own five most likely classes, named
        top = np.argsort(-p)[:5]
        assert [w for w, _, _ in row["top5"]] == [prepared.wnids[c] for c in top]
        assert [n for _, n, _ in row["top5"]] == [names[c] for c in top]
        np.testing.assert_allclose([q for _, _, q in row["top5"]], p[top], atol=1e-3)
        assert row["truth"] == names[prepared.wnids.index(row["label"])]
    for row, q in zip(rows, val_fc7):
        dist = np.linalg.norm(train_fc7 - q, axis=1)
        nearest = train_paths[np.argsort(dist)[:6]]
        got = [p for p, _ in row["neighbours"]]
        assert got == list(nearest) or set(got) == set(nearest)  # ties may swap order
        assert [d for _, d in row["neighbours"]] == sorted(d for _, d in row["neighbours"])


def test_a_second_evaluation_reuses_the_stored_outputs(members, learnable, mlflow_uri, capsys):
    first = ["--data", str(learnable), "--runs", *members, "--sizes", "3", "--crops", "center", "--figure4", "0"]
    assert eval_cli.main([*first, "--run-name", "reuse-1"]) == 0
    capsys.readouterr()
    prepared = read_prepared(learnable)
    client = MlflowClient(mlflow_uri)
    folders = {r: _folder(mlflow_uri, r, prepared) for r in members}
    before = {r: [(a.path, a.file_size) for a in client.list_artifacts(r, folders[r])] for r in members}
    assert all(before.values())
    assert eval_cli.main([*first, "--run-name", "reuse-2"]) == 0
    out = capsys.readouterr().out
    assert "inference" not in out and out.count("stored outputs reused") == 3
    assert {r: [(a.path, a.file_size) for a in client.list_artifacts(r, folders[r])] for r in members} == before
    exp = client.get_experiment_by_name("ensembles").experiment_id
    errors = []
    for name in ("reuse-1", "reuse-2"):
        (parent,) = client.search_runs([exp], filter_string=f"tags.mlflow.runName = '{name}'")
        errors.append(_eval_runs(mlflow_uri, parent.info.run_id)[(3, "center")].data.metrics["val/top1_err"])
    assert errors[0] == errors[1]


def test_bad_members_exit_2_naming_the_problem(members, learnable, mlflow_uri, tmp_path, capsys):
    common = ["--data", str(learnable), "--figure4", "0"]
    assert eval_cli.main([*common, "--runs", members[0], "0123456789abcdef0123456789abcdef"]) == 2
    assert "0123456789abcdef0123456789abcdef not found" in capsys.readouterr().err
    assert eval_cli.main([*common, "--runs", *members, "--sizes", "5"]) == 2
    assert "--sizes 5 need more members than the 3 found" in capsys.readouterr().err
    assert eval_cli.main([*common, "--experiment", "no-such-experiment"]) == 2
    assert "no-such-experiment" in capsys.readouterr().err
    # a finished training run whose checkpoint file is not a checkpoint
    client = MlflowClient(mlflow_uri)
    source = client.get_run(members[0])
    bad = tmp_path / "bad-checkpoint"
    bad.mkdir()
    (bad / "state.pt").write_bytes(b"not a checkpoint")
    tags = {k: v for k, v in source.data.tags.items() if k not in ("ray_run_name", "ray_storage")}
    run = client.create_run(source.info.experiment_id, tags=tags | {"best_checkpoint": str(bad),
                                                                    "mlflow.runName": "broken"})
    client.log_param(run.info.run_id, "num_classes", source.data.params["num_classes"])
    client.set_terminated(run.info.run_id, "FINISHED")
    assert eval_cli.main([*common, "--runs", members[0], run.info.run_id]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {bad / 'state.pt'} is unreadable" in err


@pytest.fixture(scope="module")
def three_classes(learnable, ray_cluster, mlflow_uri) -> Path:
    """The learnable tree's first 3 classes: another class count for fine-tuning."""
    from alexnet.preprocess import run_preprocess

    out = learnable.parent / "three"
    if not (out / "summary.json").is_file():
        run_preprocess(PreprocessConfig(input=learnable.parent / "root", output=out, size=72, classes=3,
                                        tracking_uri=mlflow_uri), log=lambda _: None)
    return out


def test_fine_tuning_from_a_member_with_a_new_class_count(members, three_classes, learnable, small_args, mlflow_uri,
                                                          tmp_path, capsys):
    source = read_state(checkpoint_of_run(mlflow_uri, members[0]))
    # the weights must fit: a sixth conv layer the member does not have is refused before training
    common = ["--data", str(three_classes), "--init-from", members[0], "--storage-path", str(tmp_path), *small_args]
    assert train_cli.main([*common, "--extra-conv", "--run-name", "ft-refused"]) == 2
    assert "conv6" in capsys.readouterr().err
    # a learning rate of ~0 keeps the transferred weights: everything but the new output layer equals the member's
    argv = [*common, "--epochs", "1", "--run-name", "fine-tuned", "--lr", "1e-12", "--weight-decay", "0"]
    assert train_cli.main(argv) == 0
    run_id = capsys.readouterr().out.split("MLflow run id: ")[1].split()[0]
    tuned = read_state(checkpoint_of_run(mlflow_uri, run_id))
    for key, value in source["model"].items():
        if key.startswith("fc8."):
            assert tuned["model"][key].shape[0] == 3 and value.shape[0] == 4
        else:
            torch.testing.assert_close(tuned["model"][key], value, rtol=0, atol=1e-6)
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.tags["init_from_checkpoint"] == checkpoint_of_run(mlflow_uri, members[0])
    assert run.data.params["num_classes"] == "3"
    # a member trained on 4 classes cannot join an ensemble evaluated on the 3-class data
    assert eval_cli.main(["--data", str(three_classes), "--runs", members[0], run_id, "--sizes", "1",
                          "--figure4", "0"]) == 2
    assert "another class list" in capsys.readouterr().err


def test_rerunning_the_members_command_leaves_finished_members_untouched(members, trio_argv, mlflow_uri, capsys):
    """Measured before: the rerun re-opened every finished run, started Ray Train and logged another model."""
    client = MlflowClient(mlflow_uri)
    before = {r: client.get_run(r) for r in members}
    models = {r: len(client.search_logged_models(experiment_ids=[before[r].info.experiment_id],
                                                 filter_string=f"source_run_id = '{r}'")) for r in members}
    start = time.time()
    assert train_cli.main(trio_argv) == 0
    out = capsys.readouterr().out
    assert time.time() - start < 20  # no Ray Train run started
    assert out.count("epochs: left as it is") == 3, out
    for r in members:
        run = client.get_run(r)
        assert run.info.status == "FINISHED" and run.info.end_time == before[r].info.end_time
        assert len(client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                               filter_string=f"source_run_id = '{r}'")) == models[r] == 1
        assert f"MLflow run id: {r}" in out


def test_a_member_whose_weights_changed_is_inferred_again(members, learnable, mlflow_uri, capsys):
    """Stored outputs were keyed by the validation set only: after a member was extended (same run, a new
    best checkpoint) the next evaluation reused outputs of weights that no longer existed."""
    client = MlflowClient(mlflow_uri)
    argv = ["--data", str(learnable), "--runs", *members, "--sizes", "3", "--crops", "center", "--figure4", "0"]
    assert eval_cli.main([*argv, "--run-name", "before-change"]) == 0
    best = client.get_run(members[0]).data.tags["best_checkpoint"]
    other = sorted(str(c) for c in Path(best).parent.glob("checkpoint_*") if str(c) != best)[0]
    client.set_tag(members[0], "best_checkpoint", other)  # what finishing an extended run does
    try:
        capsys.readouterr()
        assert eval_cli.main([*argv, "--run-name", "after-change"]) == 0
        out = capsys.readouterr().out
        name = client.get_run(members[0]).data.tags["mlflow.runName"]
        assert f"{name}: inference (center)" in out and out.count("stored outputs reused") == 2, out
    finally:
        client.set_tag(members[0], "best_checkpoint", best)


def test_a_damaged_validation_image_is_left_out_of_the_evaluation_and_named(members, learnable, mlflow_uri, tmp_path,
                                                                          capsys):
    import shutil

    from tests.integration.test_train import _damage_jpegs_in_place

    data = tmp_path / "data"
    shutil.copytree(learnable, data)
    shard = sorted((data / "val").glob("*.parquet"))[0]
    victim = pq.read_table(shard, columns=["path"])["path"][2].as_py()
    _damage_jpegs_in_place(shard, [2])
    argv = ["--data", str(data), "--runs", members[0], "--sizes", "1", "--crops", "center", "--figure4", "0",
            "--run-name", "damaged-val"]
    assert eval_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"WARNING: 1 stored validation image(s) do not decode and are left out of the evaluation: {victim}" in out
    client = MlflowClient(mlflow_uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("ensembles").experiment_id],
                                   filter_string="tags.mlflow.runName = 'damaged-val'")
    assert parent.data.params["val_images"] == "47"  # 48 stored


def test_the_registered_ensemble_predicts_and_is_served_over_http(members, learnable, mlflow_uri, tmp_path, capsys):
    """--register-model: the largest ensemble as one pyfunc model in the Model Registry; loaded in-process it
    gives the evaluation's own averaged softmax on the stored JPEG bytes, and `mlflow models serve` answers a real
    HTTP call on 127.0.0.1 with the top-5 class names."""
    import base64
    import contextlib
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    import mlflow.pyfunc
    import pandas as pd

    name = f"alexnet-ensemble-{os.getpid()}"
    argv = ["--data", str(learnable), "--runs", *members, "--sizes", "1", "3", "--crops", "center", "--figure4", "0",
            "--run-name", "eval-registered", "--register-model", name]
    assert eval_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"as models:/{name}/1" in out
    client = MlflowClient(mlflow_uri)
    assert client.get_model_version(name, "1").status == "READY"
    # the logged model is named for what it is and shows the ensemble's error
    exp = client.get_experiment_by_name("ensembles").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.mlflow.runName = 'eval-registered'")
    (logged,) = client.search_logged_models(experiment_ids=[exp],
                                            filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert logged.name == "3-CNNs-center" and client.get_model_version(name, "1").source == f"models:/{logged.model_id}"
    assert {m.key: m.value for m in logged.metrics}["largest/center/top1_err"] == \
        parent.data.metrics["largest/center/top1_err"]

    prepared = read_prepared(learnable)
    val = pq.read_table(prepared.val_files).sort_by("path").slice(0, 6).to_pydict()
    images = pd.DataFrame({"image": [*val["image"], b"not an image"]})
    mlflow.set_tracking_uri(mlflow_uri)
    predicted = mlflow.pyfunc.load_model(f"models:/{name}/1").predict(images)
    assert len(predicted) == 7 and predicted["error"].tolist()[:6] == [""] * 6 and predicted["error"][6]
    stored = [_stored(mlflow_uri, r, _folder(mlflow_uri, r, prepared), "center", tmp_path / r) for r in members]
    index = {p: i for i, p in enumerate(stored[0][0])}
    expected = np.mean([s[2][[index[p] for p in val["path"]]] for s in stored], axis=0)
    np.testing.assert_allclose(np.stack(predicted["probabilities"][:6]), expected, atol=2e-3)
    names = {c["wnid"]: c["name"] for c in json.loads((learnable / "classes.json").read_text())["classes"]}
    top = predicted["top5"][0]
    assert len(top) == 4 and top[0]["wnid"] == prepared.wnids[int(np.argmax(expected[0]))]  # 4 classes only
    assert all(t["name"] == names[t["wnid"]] for t in top)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the venv's bin/ first, as in an activated venv: the server runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/1",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "wb"),
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(val["image"][0]).decode()]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(answer) == 1 and [t["name"] for t in answer[0]["top5"]] == [t["name"] for t in top]
    np.testing.assert_allclose(answer[0]["probabilities"], expected[0], atol=2e-3)
