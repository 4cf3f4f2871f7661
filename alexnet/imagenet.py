"""The ImageNet tree: class index, the two validation layouts, labels and synset names."""

from __future__ import annotations

import csv
import os
import time
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
    wnids = tuple(sorted(e.name for e in os.scandir(train) if e.is_dir() and not hidden(e.name)))
    if not wnids:
        raise UsageError(f"{train} holds no class folders")
    empty = [w for w in wnids if not any(e.is_file() and not hidden(e.name) for e in os.scandir(train / w))]
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise UsageError(f"{len(empty)} empty class folder(s) under {train}: {shown}")

    val_dir = root / "val"
    if not val_dir.is_dir():
        if val_labels is not None:
            raise UsageError(f"--val-labels given but {val_dir} does not exist")
        return Layout(root, wnids, None, None)
    has_folders = any(e.is_dir() and not hidden(e.name) for e in os.scandir(val_dir))
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


def hidden(name: str) -> bool:
    """Names starting with a dot (.ipynb_checkpoints, .DS_Store): skipped and counted, never a class or an image."""
    return name.startswith(".")


# A file name that is not UTF-8 reaches Python as lone surrogates (U+DC80-U+DCFF, os.fsdecode's
# surrogateescape), which Arrow cannot store. Such names travel as the private-use characters
# U+F780-U+F7FF instead, losslessly, and are mapped back to open the file.
_TO_STORED = {0xDC80 + i: 0xF780 + i for i in range(128)}
_FROM_STORED = {v: k for k, v in _TO_STORED.items()}


def stored_name(name: str) -> str:
    return name.translate(_TO_STORED)


def fs_path(root: str | Path, rel: str) -> Path:
    """The file on disk of a stored relative path."""
    return Path(root) / rel.translate(_FROM_STORED)


# What an entry of a class folder is; every kind but "file" and "hidden" is a reject with this reason.
ENTRY_REASONS = {"dir": "a folder inside a class folder (nested folders are not read)",
                 "broken-link": "a broken symbolic link",
                 "special": "not a regular file (a FIFO, socket or device)"}


def entry_kind(entry: os.DirEntry) -> str:
    if hidden(entry.name):
        return "hidden"
    if entry.is_dir():
        return "dir"
    if entry.is_file():  # follows symbolic links: a link to an image is an image
        return "file"
    return "broken-link" if entry.is_symlink() and not os.path.exists(entry.path) else "special"


def list_folder(folder: str) -> list[tuple[str, str]]:
    """(stored name, kind) of every entry of one folder, sorted; one scandir per class, run in parallel."""
    with os.scandir(folder) as it:
        return sorted((stored_name(e.name), entry_kind(e)) for e in it)


def _list_folders_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Ray Data task: list a batch of folders; `kind` tells images from everything else."""
    out: dict[str, list] = {"split": [], "path": [], "wnid": [], "kind": []}
    for split, folder, rel, wnid in zip(batch["split"], batch["folder"], batch["rel"], batch["wnid"]):
        for name, kind in list_folder(folder):
            out["split"].append(split)
            out["path"].append(f"{rel}/{name}")
            out["wnid"].append(wnid)
            out["kind"].append(kind)
    return out


def _loose_entries(layout: Layout) -> tuple[list[tuple[str, str]], int]:
    """Entries the class folders do not hold: files right under train/ (and under a val/ of folders) are
    rejects; hidden entries there are skipped. (rejects, hidden count)"""
    rejects, skipped = [], 0
    places = [("train", "images belong in train/<wnid>/")]
    if layout.val == "folders":
        places.append(("val", "this val/ holds class folders; images belong in val/<wnid>/"))
    for split, where in places:
        for name, kind in list_folder(str(layout.root / split)):
            if kind == "hidden":
                skipped += 1
            elif kind != "dir":
                rejects.append((f"{split}/{name}", f"{ENTRY_REASONS.get(kind, 'a file')} directly under {split}/: "
                                                   f"{where}"))
    return rejects, skipped


def list_files(layout: Layout, classes: int | None = None, limit: int | None = None,
               wait_s: float = 600.0) -> tuple[dict[str, pa.Table], list[tuple[str, str]], int]:
    """{split: table(path, label, wnid)} of the files to process (the first `classes` classes, the first `limit`
    files of each split), sorted by path; the listing's rejects; how many hidden entries were skipped.
    The listing tasks may wait `wait_s` for a CPU (`alexnet.cluster.watched`)."""
    import ray

    from alexnet.cluster import watched
    from alexnet.datasets import one_stage

    folders = [("train", f"train/{w}", w) for w in layout.wnids]
    if layout.val == "folders":
        folders += [("val", f"val/{e.name}", e.name) for e in os.scandir(layout.root / "val")
                    if e.is_dir() and not hidden(e.name)]
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

    rejects, skipped = _loose_entries(layout)
    files: dict[str, pa.Table] = {}
    for split in ("train", "val"):
        cols = table.filter(pc.equal(table["split"], split)).to_pydict()
        paths, labels, wnids = [], [], []
        for path, wnid, kind in zip(cols["path"], cols["wnid"], cols["kind"]):
            if kind == "hidden":
                skipped += 1
                continue
            if split == "val" and layout.val == "flat":
                wnid = val_labels.get(Path(path).stem)
                if wnid is None:
                    rejects.append((path, f"no label for {Path(path).stem} in {layout.val_labels}")
                                   if kind == "file" else (path, ENTRY_REASONS[kind]))
                    continue
            if wnid not in index:
                rejects.append((path, f"class {wnid} is not among the train classes"))
                continue
            if wnid not in kept:
                continue  # excluded by --classes
            if kind != "file":
                rejects.append((path, ENTRY_REASONS[kind]))
                continue
            paths.append(path), labels.append(index[wnid]), wnids.append(wnid)
        if limit:
            paths, labels, wnids = paths[:limit], labels[:limit], wnids[:limit]
        files[split] = pa.table({"path": paths, "label": pa.array(labels, pa.int32()), "wnid": wnids})
    return files, rejects, skipped


READ_TRIES = 3


def read_with_retries(path: Path, tries: int = READ_TRIES, pause_s: float = 0.2) -> bytes:
    """A file's bytes; an OSError other than a missing file is retried (network file systems fail transiently),
    the last one re-raised with the number of tries in its message."""
    for attempt in range(1, tries + 1):
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise OSError(f"unreadable: {err.strerror or err}") from err  # retrying does not help these
        except OSError as err:
            if attempt == tries:
                raise OSError(f"unreadable after {tries} tries: {err.strerror or err}") from err
            time.sleep(pause_s * attempt)
    raise AssertionError("unreachable")


def classes_all_rejected(train: pa.Table, rejects: list[tuple[str, str]], wnids: tuple[str, ...]) -> dict[str, int]:
    """{wnid: files} of the classes whose every listed training file was rejected."""
    refused = {path for path, _ in rejects}
    listed: dict[str, list[str]] = {}
    for path, wnid in zip(train["path"].to_pylist(), train["wnid"].to_pylist()):
        listed.setdefault(wnid, []).append(path)
    return {w: len(listed[w]) for w in wnids if listed.get(w) and all(p in refused for p in listed[w])}
