"""An extracted ImageNet-style tree packed the two ways ImageNet is downloaded (tests, benchmarks, trying it out).

    pack_ilsvrc(TREE, DEST)   ILSVRC2012_img_train.tar (a tar of <wnid>.tar), ILSVRC2012_img_val.tar (flat, in
                              shuffled member order), ILSVRC2012_devkit_t12.tar.gz (ground truth + meta.mat whose
                              ILSVRC2012_IDs are not in wnid order, with non-leaf synsets too)
    pack_hf(TREE, DEST)       data/{train,validation,test}-NNNNN-of-NNNNN.parquet (image = {bytes, path}, label)
                              and classes.py, as the Hugging Face imagenet-1k snapshot
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alexnet.archives import DEVKIT, GROUND_TRUTH, META, TRAIN_TAR, VAL_TAR
from alexnet.imagenet import read_synset_names, read_val_labels


def _tree(tree: Path) -> tuple[list[str], dict[str, list[Path]], list[tuple[Path, str]]]:
    """(sorted wnids, {wnid: train files}, [(val file, wnid)]) of a tree with a flat or foldered val/."""
    wnids = sorted(p.name for p in (tree / "train").iterdir() if p.is_dir())
    train = {w: sorted(p for p in (tree / "train" / w).iterdir() if p.is_file()) for w in wnids}
    val: list[tuple[Path, str]] = []
    if (tree / "LOC_val_solution.csv").is_file():
        labels = read_val_labels(tree / "LOC_val_solution.csv")
        val = [(p, labels[p.stem]) for p in sorted((tree / "val").iterdir()) if p.is_file()]
    elif (tree / "val").is_dir():
        val = [(p, d.name) for d in sorted((tree / "val").iterdir()) if d.is_dir() for p in sorted(d.iterdir())]
    return wnids, train, val


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def pack_ilsvrc(tree: Path, dest: Path, seed: int = 0) -> None:
    tree, dest = Path(tree), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wnids, train, val = _tree(tree)
    with tarfile.open(dest / TRAIN_TAR, "w", format=tarfile.USTAR_FORMAT) as outer:
        for w in wnids:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for p in train[w]:
                    _add(tar, p.name, p.read_bytes())
            _add(outer, f"{w}.tar", inner.getvalue())
    rng = np.random.default_rng(seed)
    with tarfile.open(dest / VAL_TAR, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in rng.permutation(len(val)):  # member order is not file-name order
            _add(tar, val[i][0].name, val[i][0].read_bytes())
    # ILSVRC2012_IDs: leaves get 1..K in an order that is not the wnids' sorted order; two parents follow.
    ids = {w: int(i) + 1 for w, i in zip(wnids, rng.permutation(len(wnids)))}
    names = read_synset_names(tree)
    synsets = [(ids[w], w, names.get(w, w), 0) for w in wnids]
    synsets += [(len(wnids) + 1, "n00001740", "entity", 2), (len(wnids) + 2, "n00002684", "object", len(wnids))]
    table = np.zeros((len(synsets), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                               ("gloss", "O"), ("num_children", "O")])
    for row, (i, w, words, children) in enumerate(synsets):
        table[row, 0] = (np.array([[i]], np.uint16), w, words, f"a {words}", np.array([[children]], np.uint16))
    meta = io.BytesIO()
    from scipy.io import savemat

    savemat(meta, {"synsets": table})
    truth = "".join(f"{ids[w]}\n" for _, w in sorted(val, key=lambda v: v[0].name))
    with tarfile.open(dest / f"{DEVKIT}.tar.gz", "w:gz") as tar:
        _add(tar, f"{DEVKIT}/{GROUND_TRUTH}", truth.encode())
        _add(tar, f"{DEVKIT}/{META}", meta.getvalue())
        _add(tar, f"{DEVKIT}/COPYING", b"sample devkit\n")


def pack_hf(tree: Path, dest: Path, seed: int = 0, files_per_split: int = 2, rows_per_group: int = 8,
            test_rows: int = 5) -> None:
    tree, dest = Path(tree), Path(dest)
    (dest / "data").mkdir(parents=True, exist_ok=True)
    wnids, train, val = _tree(tree)
    names = read_synset_names(tree)
    label = {w: i for i, w in enumerate(wnids)}
    rng = np.random.default_rng(seed)
    splits = {"train": [(p, label[w]) for w in wnids for p in train[w]],
              "validation": [(p, label[w]) for p, w in val],
              "test": [(p, -1) for p, _ in val[:test_rows]]}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())])
    for split, rows in splits.items():
        rows = [rows[i] for i in rng.permutation(len(rows))]
        for k, part in enumerate(np.array_split(np.arange(len(rows)), files_per_split)):
            table = pa.table({"image": [{"bytes": rows[i][0].read_bytes(), "path": rows[i][0].name} for i in part],
                              "label": [rows[i][1] for i in part]}, schema=schema)
            pq.write_table(table, dest / "data" / f"{split}-{k:05d}-of-{files_per_split:05d}.parquet",
                           row_group_size=rows_per_group)
    entries = "".join(f'        "{w}": {names.get(w, w)!r},\n' for w in wnids)
    (dest / "classes.py").write_text("# coding=utf-8\nfrom collections import OrderedDict\n\n"
                                     f"IMAGENET2012_CLASSES = OrderedDict(\n    {{\n{entries}    }}\n)\n")
