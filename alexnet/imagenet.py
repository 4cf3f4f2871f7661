"""The ImageNet tree: class index, the two validation layouts, labels and synset names."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alexnet.config import UsageError

VAL_SOLUTION_CSV = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"


@dataclass(frozen=True)
class Layout:
    """What was found under ROOT, checked before any Ray work starts."""

    root: Path
    wnids: tuple[str, ...]          # all train classes, sorted: the class index
    val: str | None                 # "folders", "flat" or None (no val/)
    val_labels: Path | None         # the CSV used for a flat val/


def detect_layout(root: Path, output: Path, val_labels: Path | None = None) -> Layout:
    """Validate ROOT and find its layout; every problem is a one-line UsageError."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"input folder {root} does not exist")
    train = root / "train"
    if not train.is_dir():
        raise UsageError(f"{root} has no train/ folder (expected {train}/<wnid>/*.JPEG)")
    out, inp = Path(output).resolve(), root.resolve()
    if out == inp or inp in out.parents:
        raise UsageError(f"output {output} lies inside the input {root}; choose a folder outside it")
    if out in inp.parents:  # --overwrite would delete the images before reading them
        raise UsageError(f"input {root} lies inside the output {output}; choose an output folder outside it")
    wnids = tuple(sorted(e.name for e in os.scandir(train) if e.is_dir()))
    if not wnids:
        raise UsageError(f"{train} holds no class folders")
    empty = [w for w in wnids if not any(e.is_file() for e in os.scandir(train / w))]
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise UsageError(f"{len(empty)} empty class folder(s) under {train}: {shown}")

    val_dir = root / "val"
    if not val_dir.is_dir():
        if val_labels is not None:
            raise UsageError(f"--val-labels given but {val_dir} does not exist")
        return Layout(root, wnids, None, None)
    has_folders = any(e.is_dir() for e in os.scandir(val_dir))
    if has_folders and val_labels is None:
        return Layout(root, wnids, "folders", None)
    labels = Path(val_labels) if val_labels is not None else root / VAL_SOLUTION_CSV
    if not labels.is_file():
        raise UsageError(f"{val_dir} is flat but {labels} is missing; pass --val-labels PATH")
    read_val_labels(labels)  # fail now, not after the listing, if it is unreadable
    return Layout(root, wnids, "flat", labels)


def read_val_labels(path: Path) -> dict[str, str]:
    """`ImageId,PredictionString` -> {image id: wnid}; the wnid is PredictionString's first token."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                raise UsageError(f"{path}: expected the header ImageId,PredictionString")
            labels = {}
            for line, row in enumerate(reader, start=2):
                tokens = (row["PredictionString"] or "").split()
                if not row["ImageId"] or not tokens:
                    raise UsageError(f"{path}:{line}: empty ImageId or PredictionString")
                labels[row["ImageId"]] = tokens[0]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"cannot read validation labels {path}: {err}") from err
    return labels


def read_synset_names(root: Path) -> dict[str, str]:
    """{wnid: name} from LOC_synset_mapping.txt when present ('n01440764 tench, Tinca tinca')."""
    path = Path(root) / SYNSET_MAPPING
    if not path.is_file():
        return {}
    names = {}
    for line in path.read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip()
    return names


def list_folder(folder: str) -> list[tuple[str, bool]]:
    """(name, is_file) of every entry of one folder, sorted; one scandir per class, run in parallel."""
    with os.scandir(folder) as it:
        return sorted((e.name, e.is_file()) for e in it)


def _list_folders_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Ray Data task: list a batch of folders; `kind` tells files from stray sub-folders."""
    out: dict[str, list] = {"split": [], "path": [], "wnid": [], "is_file": []}
    for split, folder, rel, wnid in zip(batch["split"], batch["folder"], batch["rel"], batch["wnid"]):
        for name, is_file in list_folder(folder):
            out["split"].append(split)
            out["path"].append(f"{rel}/{name}")
            out["wnid"].append(wnid)
            out["is_file"].append(is_file)
    return out


def list_files(layout: Layout, classes: int | None = None, limit: int | None = None,
               wait_s: float = 600.0) -> tuple[dict[str, pa.Table], list[tuple[str, str]]]:
    """{split: table(path, label, wnid)} of the files to process (the first `classes` classes, the first `limit`
    files of each split), sorted by path, and the listing's rejects. The listing tasks may wait `wait_s`
    for a CPU (`alexnet.cluster.watched`)."""
    import ray

    from alexnet.cluster import watched
    from alexnet.datasets import one_stage

    folders = [("train", f"train/{w}", w) for w in layout.wnids]
    if layout.val == "folders":
        folders += [("val", f"val/{e.name}", e.name) for e in os.scandir(layout.root / "val") if e.is_dir()]
    elif layout.val == "flat":
        folders.append(("val", "val", ""))
    items = [{"split": s, "folder": str(layout.root / rel), "rel": rel, "wnid": w} for s, rel, w in folders]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * cpus)))
    listed = one_stage(ds.map_batches(_list_folders_batch, batch_size=8, batch_format="numpy"))
    table = pa.concat_tables(list(watched(listed.iter_batches(batch_size=None, batch_format="pyarrow"), wait_s,
                                          {"CPU": 1.0}, "the listing tasks")))
    table = table.sort_by("path")

    keep_wnids = layout.wnids[:classes] if classes else layout.wnids
    index = {w: i for i, w in enumerate(layout.wnids)}
    kept = set(keep_wnids)
    val_labels = read_val_labels(layout.val_labels) if layout.val == "flat" else {}

    rejects: list[tuple[str, str]] = []
    files: dict[str, pa.Table] = {}
    for split in ("train", "val"):
        cols = table.filter(pc.equal(table["split"], split)).to_pydict()
        paths, labels, wnids = [], [], []
        for path, wnid, is_file in zip(cols["path"], cols["wnid"], cols["is_file"]):
            if split == "val" and layout.val == "flat":
                wnid = val_labels.get(Path(path).stem)
                if wnid is None:
                    if is_file:
                        rejects.append((path, f"no label for {Path(path).stem} in {layout.val_labels}"))
                    continue
            if wnid not in index:
                rejects.append((path, f"class {wnid} is not among the train classes"))
                continue
            if wnid not in kept:
                continue  # excluded by --classes
            if not is_file:
                rejects.append((path, "a folder inside a class folder (nested folders are not read)"))
                continue
            paths.append(path), labels.append(index[wnid]), wnids.append(wnid)
        if limit:
            paths, labels, wnids = paths[:limit], labels[:limit], wnids[:limit]
        files[split] = pa.table({"path": paths, "label": pa.array(labels, pa.int32()), "wnid": wnids})
    return files, rejects
