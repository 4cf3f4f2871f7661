"""preprocess.py on ImageNet as it is downloaded: image-net.org's archives and the Hugging Face Parquet release,
each against the extracted tree it was packed from."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from alexnet.archives import TRAIN_TAR, Window
from alexnet.packing import pack_hf, pack_ilsvrc
from alexnet.sample import SampleConfig, make_sample
from pipelines import preprocess as cli

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIZE = "40"


def _run(root: Path, out: Path, *extra: str) -> dict:
    assert cli.main(["--input", str(root), "--output", str(out), "--size", SIZE, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def _rows(out: Path, split: str) -> list[tuple]:
    t = pq.read_table(out / split).to_pydict()
    return sorted(zip(t["path"], t["label"], t["wnid"], t["image"]))


def _rejects(out: Path) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in csv.DictReader(open(out / "rejects.csv"))}


@pytest.fixture(scope="module")
def tree(tmp_path_factory, ray_cluster, mlflow_uri) -> tuple[Path, Path]:
    """A sample tree with ImageNet's quirks and broken files, and its preprocessing output."""
    base = tmp_path_factory.mktemp("formats")
    root = base / "tree"
    make_sample(SampleConfig(output=root, num_classes=3, train_per_class=7, val_per_class=4, seed=3, broken=4))
    out = base / "out-tree"
    _run(root, out)
    return root, out


@pytest.mark.parametrize("kind", ["ilsvrc-archives", "hf-parquet"])
def test_a_download_gives_the_extracted_trees_rows_statistics_and_classes(kind, tree, tmp_path):
    root, tree_out = tree
    packed = tmp_path / kind
    (pack_ilsvrc if kind == "ilsvrc-archives" else pack_hf)(root, packed, seed=5)
    out = tmp_path / "out"
    summary = _run(packed, out)
    assert summary["input_kind"] == kind
    assert MlflowClient().get_run(summary["mlflow_run_id"]).data.tags["input_kind"] == kind
    assert summary["not_read"] == ({"test": 5} if kind == "hf-parquet" else {})
    whole = json.loads((tree_out / "summary.json").read_text())
    for key in ("files_found", "rows_written", "rejects"):
        assert summary[key] == whole[key], key
    for split in ("train", "val"):  # the same images under the same paths, labels and stored pixels
        assert _rows(out, split) == _rows(tree_out, split), split
    assert set(_rejects(out)) == set(_rejects(tree_out))
    for name in ("classes.json", "pca.json"):
        assert (out / name).read_text() == (tree_out / name).read_text(), name
    np.testing.assert_array_equal(np.load(out / "mean_image.npy"), np.load(tree_out / "mean_image.npy"))


def test_archive_members_that_are_no_image_or_cut_off_are_rejects_with_where_they_lie(tree, tmp_path):
    root, tree_out = tree
    packed = tmp_path / "ilsvrc"
    pack_ilsvrc(root, packed)
    # cut the train tar inside the last good image of its last class tar: members after it are gone
    good = {r[0] for r in _rows(tree_out, "train")}
    with tarfile.open(packed / TRAIN_TAR) as outer:
        last_class = [m for m in outer if m.name.endswith(".tar")][-1]
    wnid = Path(last_class.name).stem
    with open(packed / TRAIN_TAR, "rb") as f:
        members = [m for m in tarfile.open(fileobj=Window(f, last_class.offset_data, last_class.size)) if m.isreg()]
    k = max(i for i, m in enumerate(members) if f"train/{wnid}/{m.name}" in good)
    last, gone = members[k], {f"train/{wnid}/{m.name}" for m in members[k + 1:]}
    with open(packed / TRAIN_TAR, "r+b") as f:
        f.truncate(last_class.offset_data + last.offset_data + last.size // 2)
    out = tmp_path / "out"
    summary = _run(packed, out)
    lost = f"train/{wnid}/{last.name}"
    rejects, tree_rejects = _rejects(out), _rejects(tree_out)
    assert rejects[lost].startswith(f"truncated member: only {last.size // 2} of its {last.size} bytes")
    assert f"[{TRAIN_TAR}, bytes " in rejects[lost]
    broken_off = {f"train/{TRAIN_TAR}", f"train/{wnid}.tar"}  # both tars end early: said once each
    assert set(rejects) == (set(tree_rejects) - gone) | {lost} | broken_off
    assert all("ends or breaks after" in rejects[p] and "unexpected end of data" in rejects[p] for p in broken_off)
    assert any("not an image" in reason for reason in tree_rejects.values())
    for path in set(tree_rejects) - gone:  # broken files and files that are no image: their reasons, and where
        assert rejects[path].startswith(tree_rejects[path]) and f"[{TRAIN_TAR}, bytes " in rejects[path] or \
            path.startswith("val/")
    assert _rows(out, "train") == [r for r in _rows(tree_out, "train") if r[0] != lost]
    assert summary["files_found"]["train"] == summary["rows_written"]["train"] + summary["rejects"]["train"]


def test_parquet_rows_with_a_label_out_of_range_or_no_bytes_are_rejects_and_limit_and_classes_hold(tree, tmp_path):
    root, tree_out = tree
    packed = tmp_path / "hf"
    pack_hf(root, packed, files_per_split=1)
    path = packed / "data" / "train-00000-of-00001.parquet"
    t = pq.read_table(path).to_pylist()
    good = {r[0].rsplit("/", 1)[-1] for r in _rows(tree_out, "train")}
    k1, k2, k3 = [k for k, row in enumerate(t) if row["image"]["path"] in good][:3]
    t[k1]["label"], t[k2]["label"], t[k3]["image"]["bytes"] = 3, -1, None
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(path)), path, row_group_size=8)
    out = tmp_path / "out"
    summary = _run(packed, out)
    rejects = _rejects(out)
    bad = {f"train/{t[k]['image']['path']}": f"label {t[k]['label']} is outside classes.py's labels 0..2"
           for k in (k1, k2)}
    assert {p: rejects[p] for p in bad} == bad
    wnid = json.loads((tree_out / "classes.json").read_text())["classes"][t[k3]["label"]]["wnid"]
    empty = f"train/{wnid}/{t[k3]['image']['path']}"
    assert rejects[empty] == f"empty file [data/train-00000-of-00001.parquet, row group {k3 // 8}, row {k3 % 8}]"
    assert summary["rows_written"]["train"] == len(_rows(tree_out, "train")) - 3
    assert summary["files_found"]["train"] == summary["rows_written"]["train"] + summary["rejects"]["train"]

    small = tmp_path / "small"
    summary = _run(packed, small, "--classes", "2", "--limit", "4")
    assert summary["rows_written"] == {"train": 4, "val": 4} and summary["num_classes"] == 2
    assert {label for _, label, *_ in _rows(small, "val")} <= {0, 1}


def test_killed_half_way_on_the_archives_then_rerun_gives_the_trees_rows(tree, tmp_path, ray_cluster):
    root, tree_out = tree
    packed = tmp_path / "ilsvrc"
    pack_ilsvrc(root, packed)
    out = tmp_path / "out"
    args = ["--input", str(packed), "--output", str(out), "--size", SIZE, "--shard-mb", "0.001"]
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "preprocess.py"), *args,
                             "--address", ray_cluster], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "train").glob("part-*.parquet"))) < 4:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list((out / "train").glob("part-*.parquet"))) >= 4 and not (out / "summary.json").exists(), \
        "the job was not caught half-way"
    assert cli.main(args) == 0
    for split in ("train", "val"):
        rows = _rows(out, split)
        assert len({r[0] for r in rows}) == len(rows) and rows == _rows(tree_out, split)
    np.testing.assert_array_equal(np.load(out / "mean_image.npy"), np.load(tree_out / "mean_image.npy"))
