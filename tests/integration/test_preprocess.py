"""pipelines/preprocess.py end to end on the generated sample, on the shared local Ray instance."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alexnet.augment import decode_images
from alexnet.sample import SampleConfig, make_sample
from pipelines import preprocess as cli
from tests.conftest import names_in_two_places

pytestmark = pytest.mark.integration  # the shared Ray instance, MLflow servers, subprocess entry points

REPO = Path(__file__).resolve().parents[2]


def _rows(out: Path, split: str):
    return pq.read_table(out / split).to_pydict()


def test_counts_reconcile_and_every_valid_file_is_kept(prepared, sample_tree):
    out, summary = prepared
    root, manifest = sample_tree
    for split in ("train", "val"):
        assert summary["files_found"][split] == summary["rows_written"][split] + summary["rejects"][split]
    assert summary["files_found"]["train"] == manifest["train"]
    rejects = {r["path"]: r["reason"] for r in csv.DictReader(open(out / "rejects.csv"))}
    assert set(rejects) == set(manifest["broken"])
    assert all(reason for reason in rejects.values())
    train = _rows(out, "train")
    assert set(manifest["quirks"]) <= set(train["path"])  # CMYK, grey, PNG-as-JPEG, 16-bit: all kept
    good = {str(p.relative_to(root)) for p in (root / "train").rglob("*") if p.is_file()} - set(manifest["broken"])
    assert sorted(train["path"]) == sorted(good)


def test_shards_are_plain_parquet_with_the_promised_columns(prepared):
    out, summary = prepared
    classes = json.loads((out / "classes.json").read_text())["classes"]
    wnids = [c["wnid"] for c in classes]
    assert wnids == sorted(wnids) and classes[0]["name"] == "sample class 0"
    for shard in sorted((out / "train").glob("*.parquet")):
        table = pq.read_table(shard)
        assert table.schema.names == ["image", "label", "wnid", "path"]
        assert str(table.schema.field("label").type) == "int32"
        rows = table.to_pydict()
        assert all(wnids[label] == w for label, w in zip(rows["label"], rows["wnid"]))
        assert len(set(rows["label"])) > 1  # a seeded shuffle: every shard mixes classes
        assert Image.open(io.BytesIO(rows["image"][0])).size == (72, 72)


def test_val_labels_come_from_the_solution_csv(prepared, sample_tree):
    out, _ = prepared
    root, _ = sample_tree
    truth = {r["ImageId"]: r["PredictionString"].split()[0] for r in csv.DictReader(open(root / "LOC_val_solution.csv"))}
    val = _rows(out, "val")
    assert len(val["path"]) == len(truth) - 1  # one broken val file
    assert all(truth[Path(p).stem] == w for p, w in zip(val["path"], val["wnid"]))


def test_statistics_equal_numpy_over_the_stored_pixels(prepared):
    out, _ = prepared
    pixels = decode_images(_rows(out, "train")["image"]).transpose(0, 2, 3, 1).astype(np.float64)
    mean_image = np.load(out / "mean_image.npy")
    assert mean_image.shape == (72, 72, 3) and mean_image.dtype == np.float32
    assert np.abs(mean_image - pixels.mean(axis=0)).mean() < 0.5
    x = pixels.reshape(-1, 3) / 255.0
    vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    pca = json.loads((out / "pca.json").read_text())
    ours = np.asarray(pca["eigenvectors"])
    for i, j in enumerate([2, 1, 0]):  # eigh is ascending, ours descending
        assert abs(abs(ours[:, i] @ vecs[:, j]) - 1) < 0.01 or np.abs(np.abs(ours[:, i]) - np.abs(vecs[:, j])).max() < 0.01
    # JPEG removes some pixel noise, so small eigenvalues shrink a little; bound them by the largest
    np.testing.assert_allclose(pca["eigenvalues"], vals[::-1], atol=0.05 * vals.max())
    assert pca["pixel_count"] == len(pixels) * 72 * 72


def test_mlflow_holds_the_run_with_its_artifacts(prepared, mlflow_uri):
    from mlflow.tracking import MlflowClient

    _, summary = prepared
    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["size"] == "72"
    assert run.data.metrics["rows_written/train"] == summary["rows_written"]["train"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "preprocess")}
    assert {"preprocess/mean_image.png", "preprocess/pca.json", "preprocess/rejects.csv"} <= names
    out = prepared[0]
    assert not names_in_two_places(run)
    assert run.data.tags["mlflow.runName"] == f"preprocess {out.name}" and run.data.tags["data.path"] == str(out.resolve())
    # the run lasts as long as the job did (it is made at the end, and dated from the start)
    assert abs((run.info.end_time - run.info.start_time) / 1000 - summary["seconds"]) < 5


def test_folder_val_layout_classes_and_limit(tmp_path, ray_cluster, mlflow_uri):
    root = tmp_path / "root"
    make_sample(SampleConfig(output=root, num_classes=3, train_per_class=6, val_per_class=3, val_layout="folders",
                             quirks=False))
    out = tmp_path / "out"
    rc = cli.main(["--input", str(root), "--output", str(out), "--size", "32", "--classes", "2", "--limit", "5"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_written"] == {"train": 5, "val": 5}
    val = _rows(out, "val")
    assert all(Path(p).parent.name == w for p, w in zip(val["path"], val["wnid"]))
    assert set(val["label"]) <= {0, 1}
    assert len(json.loads((out / "classes.json").read_text())["classes"]) == 2


def test_chroma_444_stores_full_colour_jpegs_for_gpu_decoding(tmp_path, ray_cluster, mlflow_uri, prepared):
    import io

    from PIL import Image
    from PIL.JpegImagePlugin import get_sampling

    from alexnet.prepared import read_prepared

    root = tmp_path / "root"
    make_sample(SampleConfig(output=root, num_classes=2, train_per_class=3, val_per_class=1, quirks=False))
    assert cli.main(["--input", str(root), "--output", str(tmp_path / "out"), "--size", "32", "--chroma", "444"]) == 0
    assert read_prepared(tmp_path / "out").chroma == "444" and read_prepared(prepared[0]).chroma == "420"
    for out, sampling in ((tmp_path / "out", 0), (prepared[0], 2)):
        jpegs = _rows(out, "train")["image"]
        assert {get_sampling(Image.open(io.BytesIO(j))) for j in jpegs} == {sampling}


def test_empty_val_folder_gives_an_empty_val_split(tmp_path, ray_cluster, mlflow_uri):
    root = tmp_path / "root"
    make_sample(SampleConfig(output=root, num_classes=2, train_per_class=3, val_per_class=0, quirks=False))
    assert cli.main(["--input", str(root), "--output", str(tmp_path / "out"), "--size", "32"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_written"] == {"train": 6, "val": 0} and summary["shards"]["val"] == 0


def test_strict_exits_non_zero_after_the_report(tmp_path, sample_tree, ray_cluster, mlflow_uri, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--input", str(sample_tree[0]), "--output", str(out), "--size", "32", "--strict", "--no-stats"])
    assert rc == 1
    assert "rejected" in capsys.readouterr().err
    assert (out / "summary.json").is_file() and not (out / "mean_image.npy").exists()


def test_killed_half_way_then_rerun_gives_no_duplicates_and_no_missing_rows(tmp_path, sample_tree, ray_cluster,
                                                                            mlflow_uri):
    root, manifest = sample_tree
    out = tmp_path / "out"
    # a tiny shard budget gives one shard per image, so the job is easy to catch half-way
    args = ["--input", str(root), "--output", str(out), "--size", "64", "--shard-mb", "0.001"]
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "preprocess.py"), *args,
                             "--address", ray_cluster], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "train").glob("part-*.parquet"))) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "train").glob("part-*.parquet")))
    assert 5 <= done_before and not (out / "summary.json").exists(), "the job was not caught half-way"

    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    train = _rows(out, "train")
    assert len(train["path"]) == len(set(train["path"])) == summary["rows_written"]["train"]
    good = {str(p.relative_to(root)) for p in (root / "train").rglob("*") if p.is_file()} - set(manifest["broken"])
    assert set(train["path"]) == good
    assert not list(out.rglob("*.tmp")) and not (out / "_work").exists()
    assert not (out / ".alexnet-ray-lock").exists()  # the killed job's lock was taken over, then released

    # the statistics of the resumed run are the unbroken run's: mean image and PCA
    unbroken = tmp_path / "unbroken"
    assert cli.main([*args[:3], str(unbroken), *args[4:]]) == 0
    np.testing.assert_allclose(np.load(out / "mean_image.npy"), np.load(unbroken / "mean_image.npy"), rtol=1e-12)
    resumed, whole = (json.loads((o / "pca.json").read_text()) for o in (out, unbroken))
    np.testing.assert_allclose(resumed["eigenvalues"], whole["eigenvalues"], rtol=1e-9)
    np.testing.assert_allclose(np.abs(resumed["eigenvectors"]), np.abs(whole["eigenvectors"]), rtol=1e-9, atol=1e-12)
    assert json.loads((unbroken / "summary.json").read_text())["rows_written"] == summary["rows_written"]


def test_rerun_with_other_arguments_on_an_unfinished_output_is_refused(tmp_path, sample_tree, ray_cluster,
                                                                        mlflow_uri, capsys):
    from alexnet.prepared import write_marker

    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    write_marker(out, "0.1.0")  # an unfinished output of ours: the marker is written before anything else
    (out / "_work" / "plan.json").write_text(json.dumps({"fingerprint": "other", "shards": []}))
    assert cli.main(["--input", str(sample_tree[0]), "--output", str(out), "--size", "32"]) == 2
    assert "unfinished job" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_root", "no_train", "empty_class", "bad_labels", "flat_val_no_csv",
                                  "output_inside_input", "finished_output", "bad_size"])
def test_bad_arguments_exit_2_with_one_line(case, tmp_path, prepared, sample_tree, capsys):
    root = tmp_path / "root"
    (root / "train" / "n01").mkdir(parents=True)
    (root / "train" / "n01" / "a.JPEG").write_bytes(b"x")
    out = tmp_path / "out"
    extra: list[str] = []
    if case == "missing_root":
        root = tmp_path / "nope"
    elif case == "no_train":
        root = tmp_path / "bare"
        root.mkdir()
    elif case == "empty_class":
        (root / "train" / "n02").mkdir()
    elif case in ("bad_labels", "flat_val_no_csv"):
        (root / "val").mkdir()
        (root / "val" / "x.JPEG").write_bytes(b"x")
        if case == "bad_labels":
            (root / "LOC_val_solution.csv").write_text("nonsense\n1,2\n")
    elif case == "output_inside_input":
        out = root / "prepared"
    elif case == "finished_output":
        root, out = sample_tree[0], prepared[0]
    elif case == "bad_size":
        extra = ["--size", "4"]
    with pytest.raises(SystemExit) if case == "bad_size" else _no_raise() as exc:
        rc = cli.main(["--input", str(root), "--output", str(out), *extra])
    code = exc.value.code if case == "bad_size" else rc
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "error" in err[-1]


class _no_raise:
    value = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_job_the_cluster_never_runs_fails_within_the_bound_saying_what_it_waits_for(tmp_path, sample_tree,
                                                                                       ray_cluster, capsys):
    """Another job holds every CPU of the cluster: preprocessing's tasks never start. It stops after
    --resource-wait-s with one line naming what it waited for and what the cluster has."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    other_job = placement_group([{"CPU": 4}])
    ray.get(other_job.ready(), timeout=60)
    try:
        start = time.monotonic()
        rc = cli.main(["--input", str(sample_tree[0]), "--output", str(tmp_path / "out"), "--size", "32",
                       "--resource-wait-s", "5"])
        took = time.monotonic() - start
    finally:
        remove_placement_group(other_job)
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert ("error: waited 5 s for the listing tasks (1 CPU each) without a result: the cluster has 4 CPU in all, "
            "0 CPU free now (1 node(s))") in err, err[-3000:]
    assert took < 5 + 30, took
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_a_second_run_on_an_output_being_written_is_refused_and_the_first_completes(tmp_path, sample_tree,
                                                                                    ray_cluster, capsys):
    """Measured before the lock: a retried job deleted the running one's temp files and work folder."""
    root, manifest = sample_tree
    out = tmp_path / "out"
    args = ["--input", str(root), "--output", str(out), "--size", "64", "--shard-mb", "0.001"]
    first = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "preprocess.py"), *args,
                              "--address", ray_cluster], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "train").glob("part-*.parquet")):
            time.sleep(0.05)
        assert list((out / "train").glob("part-*.parquet")), "the first job wrote nothing"
        for extra in ([], ["--overwrite"]):
            assert cli.main([*args, *extra]) == 2
            err = capsys.readouterr().err
            assert f"another preprocessing job ({socket.gethostname()} pid {first.pid} since" in err, err
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_written"]["train"] == manifest["train"] - sum(p.startswith("train/") for p in manifest["broken"])
    assert not (out / ".alexnet-ray-lock").exists()


def test_every_entry_is_written_rejected_with_its_true_reason_or_skipped_as_hidden(tmp_path, ray_cluster, capsys):
    """Measured before: a non-UTF-8 name crashed the job (0 rows, 0 rejects); a broken link and a FIFO were
    'a folder inside a class folder'; files under train/ were never counted; .ipynb_checkpoints became a class."""
    root = tmp_path / "root"
    make_sample(SampleConfig(output=root, num_classes=3, train_per_class=4, val_per_class=1, seed=3, quirks=False))
    train = root / "train"
    a, b, c = sorted(d.name for d in train.iterdir())
    good = next((train / a).iterdir())
    odd = os.path.join(os.fsencode(train / a), b"caf\xe9 \xff.JPEG")  # not UTF-8: a valid image all the same
    with open(odd, "wb") as f:
        f.write(good.read_bytes())
    (train / a / "gone.JPEG").symlink_to(train / a / "nowhere.JPEG")
    os.mkfifo(train / a / "pipe.JPEG")
    (train / a / "nested").mkdir()
    (train / "stray.JPEG").write_bytes(good.read_bytes())
    (train / ".ipynb_checkpoints").mkdir()
    (train / ".ipynb_checkpoints" / "x.JPEG").write_bytes(good.read_bytes())
    (train / b / ".DS_Store").write_bytes(b"\0")
    for f in (train / c).iterdir():  # every image of class c is broken
        f.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert cli.main(["--input", str(root), "--output", str(out), "--size", "32"]) == 0
    captured = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    classes = [x["wnid"] for x in json.loads((out / "classes.json").read_text())["classes"]]
    assert classes == [a, b, c]  # the hidden folder is not a class
    assert summary["hidden_skipped"] == 2
    reasons = {row["path"]: row["reason"] for row in csv.DictReader(io.StringIO((out / "rejects.csv").read_text()))}
    assert reasons[f"train/{a}/gone.JPEG"] == "a broken symbolic link"
    assert reasons[f"train/{a}/pipe.JPEG"] == "not a regular file (a FIFO, socket or device)"
    assert reasons[f"train/{a}/nested"].startswith("a folder inside a class folder")
    assert reasons["train/stray.JPEG"].startswith("a file directly under train/")
    assert sum(p.startswith(f"train/{c}/") for p in reasons) == 4
    assert f"WARNING: class {c}: all 4 of its training files were rejected" in captured
    found = summary["files_found"]["train"]
    # 12 sample images, the odd name, the link, the FIFO, the nested folder, the stray file
    assert found == summary["rows_written"]["train"] + summary["rejects"]["train"] == 12 + 4 + 1
    # the odd name is kept, and its stored path leads back to the very file
    from alexnet.imagenet import fs_path

    rows = _rows(out, "train")
    (odd_path,) = [p for p in rows["path"] if p.startswith(f"train/{a}/caf")]
    assert os.fsencode(fs_path(root, odd_path)) == odd and summary["rows_written"]["train"] == 4 + 1 + 4

