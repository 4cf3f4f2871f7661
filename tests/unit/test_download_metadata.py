"""The archives' and the Parquet release's metadata, read on the driver: labels, class names, and every wrong
input refused with one line and exit 2 before any Ray work."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from alexnet.archives import DEVKIT, GROUND_TRUTH, META, TRAIN_TAR, VAL_TAR, read_archives, read_devkit
from alexnet.hfparquet import read_classes_py, read_release
from alexnet.imagenet import detect_layout, read_val_labels
from alexnet.packing import pack_hf, pack_ilsvrc
from alexnet.sample import SampleConfig, make_sample
from pipelines import preprocess as cli


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dl") / "tree"
    make_sample(SampleConfig(output=root, num_classes=4, train_per_class=2, val_per_class=2, quirks=False,
                             min_side=16, max_side=40))
    return root


def test_val_labels_come_from_the_ground_truth_through_meta_mats_ids_not_the_wnid_order(tree, tmp_path):
    pack_ilsvrc(tree, tmp_path / "a", seed=1)
    arch = read_archives(tmp_path / "a")
    truth = read_val_labels(tree / "LOC_val_solution.csv")
    assert {name: wnid for name, _, _, wnid in arch.val} == {f"{k}.JPEG": w for k, w in truth.items()}
    id_to_wnid = read_devkit(tmp_path / "a")[1]
    assert [id_to_wnid[i] for i in sorted(id_to_wnid)] != sorted(id_to_wnid.values())  # IDs not in wnid order
    assert arch.names[sorted(truth.values())[0]] == "sample class 0"
    assert [w for w, _, _ in arch.class_tars] == sorted(set(truth.values()))
    assert "n00002684" not in arch.names  # a synset with children is no class


def test_a_partial_val_tar_keeps_each_images_ground_truth_line(tree, tmp_path):
    pack_ilsvrc(tree, tmp_path / "a")
    truth = read_val_labels(tree / "LOC_val_solution.csv")
    keep = ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000005.JPEG"]
    with tarfile.open(tmp_path / "a" / VAL_TAR, "w") as tar:
        for name in keep:
            tar.add(tree / "val" / name, arcname=name)
    arch = read_archives(tmp_path / "a")
    assert {name: wnid for name, _, _, wnid in arch.val} == {n: truth[Path(n).stem] for n in keep}


def test_classes_py_is_parsed_never_executed(tmp_path):
    flag = tmp_path / "executed"
    path = tmp_path / "classes.py"
    path.write_text(f"open({str(flag)!r}, 'w').close()\nraise SystemExit(3)\n"
                    "from collections import OrderedDict\n"
                    "IMAGENET2012_CLASSES = OrderedDict({'n02': 'b, bee', 'n01': 'a'})\n")
    assert read_classes_py(path) == (("n02", "n01"), {"n02": "b, bee", "n01": "a"})
    assert not flag.exists()


def _repack_devkit(root: Path, drop: str | None = None, replace: tuple[str, bytes] | None = None) -> None:
    packed = root / f"{DEVKIT}.tar.gz"
    with tarfile.open(packed) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
    with tarfile.open(packed, "w:gz") as tar:
        for name, data in members.items():
            if drop and name.endswith(drop):
                continue
            if replace and name.endswith(replace[0]):
                data = replace[1]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


CASES = {
    "devkit_without_meta": "has no data/meta.mat",
    "devkit_without_ground_truth": f"has no {GROUND_TRUTH}",
    "ground_truth_short": "lines but ILSVRC2012_img_val.tar holds 8 images",
    "no_devkit": "needs the devkit for its labels",
    "meta_not_synsets": "is not the devkit's synsets table",
    "train_tar_compressed": "is not an uncompressed tar archive",
    "class_tar_empty": "1 empty class archive(s) in",
    "meta_not_a_mat_file": "is not the devkit's synsets table",
    "ground_truth_not_numbers": "must hold one integer ILSVRC2012_ID per line",
    "val_labels_given": "--val-labels is for an extracted val/ folder",
    "classes_py_without_dict": "defines no IMAGENET2012_CLASSES",
    "classes_py_missing": "classes.py is missing",
    "parquet_without_label": "expected the columns image (struct with bytes, path) and label (integer)",
    "parquet_without_image": "expected the columns image (struct with bytes, path) and label (integer)",
    "parquet_without_train": "has no train-*.parquet files",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_wrong_download_folder_exits_2_with_one_line_before_any_ray_work(case, tree, tmp_path, capsys):
    root = tmp_path / "in"
    extra: list[str] = []
    if case.startswith(("classes", "parquet")):
        pack_hf(tree, root)
        data = root / "data"
        if case == "classes_py_without_dict":
            (root / "classes.py").write_text("CLASSES = {'n01': 'a'}\n")
        elif case == "classes_py_missing":
            (root / "classes.py").unlink()
        elif case == "parquet_without_train":
            for p in data.glob("train-*"):
                p.unlink()
        else:
            path = next(data.glob("validation-*"))
            pq.write_table(pq.read_table(path).drop_columns(["label" if case.endswith("label") else "image"]), path)
    else:
        pack_ilsvrc(tree, root)
        if case == "devkit_without_meta":
            _repack_devkit(root, drop=META)
        elif case == "devkit_without_ground_truth":
            _repack_devkit(root, drop=GROUND_TRUTH)
        elif case == "ground_truth_short":
            _repack_devkit(root, replace=(GROUND_TRUTH, b"1\n2\n3\n"))
        elif case == "meta_not_synsets":
            from scipy.io import savemat

            buf = io.BytesIO()
            savemat(buf, {"classes": [1, 2]})
            _repack_devkit(root, replace=(META, buf.getvalue()))
        elif case == "meta_not_a_mat_file":
            _repack_devkit(root, replace=(META, b"MATLAB 5.0 MAT-file, but not really" * 10))
        elif case == "ground_truth_not_numbers":
            _repack_devkit(root, replace=(GROUND_TRUTH, b"n01440764\n" * 8))
        elif case == "class_tar_empty":
            with tarfile.open(root / TRAIN_TAR) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar}
            with tarfile.open(root / TRAIN_TAR, "w") as tar:
                for name, data in members.items():
                    if name == sorted(members)[1]:
                        data = io.BytesIO()
                        tarfile.open(fileobj=data, mode="w").close()
                        data = data.getvalue()
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        elif case == "no_devkit":
            (root / f"{DEVKIT}.tar.gz").unlink()
        elif case == "train_tar_compressed":
            with tarfile.open(root / "x.tar.gz", "w:gz") as tar:
                tar.add(root / TRAIN_TAR, arcname="inner.tar")
            (root / "x.tar.gz").replace(root / TRAIN_TAR)
        elif case == "val_labels_given":
            extra = ["--val-labels", str(tree / "LOC_val_solution.csv")]
    # an address where no Ray listens: a job that got as far as Ray would fail with another message
    rc = cli.main(["--input", str(root), "--output", str(tmp_path / "out"), "--address", "127.0.0.1:9",
                   "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and CASES[case] in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_release_is_told_from_a_tree_and_the_test_split_is_counted(tree, tmp_path):
    pack_hf(tree, tmp_path / "hf", test_rows=3)
    layout = detect_layout(tmp_path / "hf", tmp_path / "out")
    assert layout.kind == "hf-parquet" and layout.val == "parquet" and layout.source.test_rows == 3
    assert layout.wnids == tuple(sorted(read_release(tmp_path / "hf").label_wnids))
    assert detect_layout(tree, tmp_path / "out").kind == "tree"


def test_a_parquet_file_without_rows_lists_nothing(tree, tmp_path):
    from alexnet.hfparquet import list_parquet_batch
    from alexnet.imagenet import LISTING_SCHEMA

    pack_hf(tree, tmp_path / "hf", files_per_split=1)
    empty = tmp_path / "hf" / "data" / "validation-00000-of-00001.parquet"
    pq.write_table(pq.read_table(empty).slice(0, 0), empty)
    rel = str(empty.relative_to(tmp_path / "hf"))
    listed = list_parquet_batch({"split": ["val"], "source": [rel]}, str(tmp_path / "hf"), ["n01", "n02"])
    assert listed.num_rows == 0 and listed.schema == LISTING_SCHEMA
