"""Where ImageNet comes from: the extracted tree (train/<wnid>/, val/ as folders or flat + a CSV), image-net.org's
archives (alexnet.archives) or the Hugging Face Parquet release (alexnet.hfparquet); the class index, labels,
synset names, and reading one image's bytes wherever it lies."""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    val: str | None                 # "folders", "flat", "archive", "parquet" or None (no validation images)
    val_labels: Path | None         # the CSV used for a flat val/
    kind: str = "tree"              # "tree", "ilsvrc-archives" or "hf-parquet"
    names: dict[str, str] = field(default_factory=dict)  # wnid -> class name
    source: Any = None              # alexnet.archives.Archives or alexnet.hfparquet.HfRelease


INPUT_KINDS = {"tree": "the extracted tree (train/<wnid>/)", "ilsvrc-archives": "image-net.org's ILSVRC2012 archives, "
               "read in place", "hf-parquet": "the Hugging Face imagenet-1k Parquet release"}


def detect_layout(root: Path, output: Path, val_labels: Path | None = None) -> Layout:
    """Validate ROOT and find its layout; every problem is a one-line UsageError."""
    from alexnet import archives, hfparquet

    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"input folder {root} does not exist")
    out, inp = Path(output).resolve(), root.resolve()
    if out == inp or inp in out.parents:
        raise UsageError(f"output {output} lies inside the input {root}; choose a folder outside it")
    if out in inp.parents:  # --overwrite would delete the images before reading them
        raise UsageError(f"input {root} lies inside the output {output}; choose an output folder outside it")
    packed = ("ilsvrc-archives" if archives.is_archives(root) else
              "hf-parquet" if hfparquet.is_hf_release(root) else None)
    if packed and val_labels is not None:
        raise UsageError(f"--val-labels is for an extracted val/ folder; {root} holds {INPUT_KINDS[packed]}, "
                         "which carries its own validation labels")
    if packed == "ilsvrc-archives":
        source = archives.read_archives(root)
        return Layout(root, tuple(sorted({w for w, _, _ in source.class_tars})), "archive" if source.val else None,
                      None, packed, source.names, source)
    if packed == "hf-parquet":
        source = hfparquet.read_release(root)
        return Layout(root, tuple(sorted(set(source.label_wnids))),
                      "parquet" if any(s == "val" for s, _ in source.files) else None, None, packed, source.names,
                      source)
    train = root / "train"
    if not train.is_dir():
        raise UsageError(f"{root} has no train/ folder (expected {train}/<wnid>/*.JPEG), nor "
                         f"{archives.TRAIN_TAR}, nor data/train-*.parquet with classes.py")
    names = read_synset_names(root)
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
        return Layout(root, wnids, None, None, names=names)
    has_folders = any(e.is_dir() and not hidden(e.name) for e in os.scandir(val_dir))
    if has_folders and val_labels is None:
        return Layout(root, wnids, "folders", None, names=names)
    labels = Path(val_labels) if val_labels is not None else root / VAL_SOLUTION_CSV
    if not labels.is_file():
        raise UsageError(f"{val_dir} is flat but {labels} is missing; pass --val-labels PATH")
    read_val_labels(labels)  # fail now, not after the listing, if it is unreadable
    return Layout(root, wnids, "flat", labels, names=names)


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


LISTING_SCHEMA = pa.schema([("split", pa.string()), ("path", pa.string()), ("wnid", pa.string()),
                            ("kind", pa.string()), ("source", pa.string()), ("start", pa.int64()),
                            ("length", pa.int64())])
# kind: "file", "hidden", or why the entry is no image. source: "" for a file of the tree, else the archive or
# Parquet file (relative to the input) that holds it; start/length: its byte range in an archive, or its row
# group and row in a Parquet file.


def _list_folders_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Ray Data task: list a batch of folders; `kind` tells images from everything else."""
    out: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}
    for split, folder, rel, wnid in zip(batch["split"], batch["folder"], batch["rel"], batch["wnid"]):
        for name, kind in list_folder(folder):
            for key, value in zip(out, (split, f"{rel}/{name}", wnid, ENTRY_REASONS.get(kind, kind), "", 0, 0)):
                out[key].append(value)
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


def _run_listing(fn, items: list[dict], wait_s: float, **fn_kwargs) -> pa.Table:
    """`fn` over `items` as Ray Data tasks (a few items per task), the listed rows as one table."""
    import ray

    from alexnet.cluster import watched
    from alexnet.datasets import one_stage

    if not items:
        return LISTING_SCHEMA.empty_table()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * cpus)))
    listed = one_stage(ds.map_batches(fn, batch_size=8, batch_format="numpy", fn_kwargs=fn_kwargs))
    tables = [t.cast(LISTING_SCHEMA) for t in watched(listed.iter_batches(batch_size=None, batch_format="pyarrow"),
                                                      wait_s, {"CPU": 1.0}, "the listing tasks")]
    return pa.concat_tables([LISTING_SCHEMA.empty_table(), *tables])


def _listing(layout: Layout, wait_s: float) -> tuple[pa.Table, list[tuple[str, str]], int]:
    """Every entry the input holds, as LISTING_SCHEMA rows, plus the rejects and hidden entries found on the way."""
    from alexnet import archives, hfparquet

    root = str(layout.root)
    if layout.kind == "ilsvrc-archives":
        src = layout.source
        items = [{"wnid": w, "start": o, "length": n} for w, o, n in src.class_tars]
        table = _run_listing(archives.list_class_tars_batch, items, wait_s, root=root)
        val = pa.table({"split": ["val"] * len(src.val), "path": [f"val/{name}" for name, *_ in src.val],
                        "wnid": [v[3] for v in src.val], "kind": ["file"] * len(src.val),
                        "source": [archives.VAL_TAR] * len(src.val), "start": [v[1] for v in src.val],
                        "length": [v[2] for v in src.val]}, schema=LISTING_SCHEMA)
        return pa.concat_tables([table, val]), list(src.rejects), src.hidden
    if layout.kind == "hf-parquet":
        items = [{"split": split, "source": rel} for split, rel in layout.source.files]
        return _run_listing(hfparquet.list_parquet_batch, items, wait_s, root=root,
                            label_wnids=list(layout.source.label_wnids)), [], 0
    folders = [("train", f"train/{w}", w) for w in layout.wnids]
    if layout.val == "folders":
        folders += [("val", f"val/{e.name}", e.name) for e in os.scandir(layout.root / "val")
                    if e.is_dir() and not hidden(e.name)]
    elif layout.val == "flat":
        folders.append(("val", "val", ""))
    items = [{"split": s, "folder": str(layout.root / rel), "rel": rel, "wnid": w} for s, rel, w in folders]
    table = _run_listing(_list_folders_batch, items, wait_s)
    if layout.val == "flat":  # a flat val/ takes its wnids from the CSV; a file it does not name is a reject
        val_labels = read_val_labels(layout.val_labels)
        cols = table.to_pydict()
        for i, (split, path, kind) in enumerate(zip(cols["split"], cols["path"], cols["kind"])):
            if split == "val" and kind != "hidden":
                cols["wnid"][i] = val_labels.get(Path(path).stem, "")
                if not cols["wnid"][i] and kind == "file":
                    cols["kind"][i] = f"no label for {Path(path).stem} in {layout.val_labels}"
        table = pa.table(cols, schema=LISTING_SCHEMA)
    rejects, skipped = _loose_entries(layout)
    return table, rejects, skipped


def list_files(layout: Layout, classes: int | None = None, limit: int | None = None,
               wait_s: float = 600.0) -> tuple[dict[str, pa.Table], list[tuple[str, str]], int]:
    """{split: table(path, label, wnid, source, start, length)} of the images to process (the first `classes`
    classes, the first `limit` images of each split), sorted by path; the listing's rejects; how many hidden
    entries were skipped. The listing tasks may wait `wait_s` for a CPU (`alexnet.cluster.watched`)."""
    table, rejects, skipped = _listing(layout, wait_s)
    is_hidden = pc.equal(table["kind"], "hidden")
    skipped += pc.sum(is_hidden).as_py() or 0
    table = table.filter(pc.invert(is_hidden)).sort_by("path")
    known = pc.is_in(table["wnid"], value_set=pa.array(layout.wnids))
    is_file = pc.equal(table["kind"], "file")
    unknown = table.filter(pc.invert(known)).to_pydict()
    for path, wnid, kind in zip(unknown["path"], unknown["wnid"], unknown["kind"]):
        rejects.append((path, f"class {wnid} is not among the train classes" if kind == "file" or wnid else kind))
    kept = pc.is_in(table["wnid"], value_set=pa.array(layout.wnids[:classes] if classes else layout.wnids))
    bad = table.filter(pc.and_(kept, pc.invert(is_file))).to_pydict()  # --classes drops the other classes' files
    rejects += list(zip(bad["path"], bad["kind"]))
    good = table.filter(pc.and_(kept, is_file))
    good = good.append_column("label", pc.cast(pc.index_in(good["wnid"], value_set=pa.array(layout.wnids)),
                                               pa.int32()))
    files = {}
    for split in ("train", "val"):
        rows = good.filter(pc.equal(good["split"], split)).select(["path", "label", "wnid", "source", "start",
                                                                     "length"])
        files[split] = rows.slice(0, limit) if limit else rows
    return files, rejects, skipped


READ_TRIES = 3


def read_with_retries(path: Path, tries: int = READ_TRIES, pause_s: float = 0.2, read=None) -> bytes:
    """A file's bytes (or `read()`'s); an OSError other than a missing file is retried (network file systems fail
    transiently), the last one re-raised with the number of tries in its message."""
    for attempt in range(1, tries + 1):
        try:
            return path.read_bytes() if read is None else read()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise OSError(f"unreadable: {err.strerror or err}") from err  # retrying does not help these
        except OSError as err:
            if getattr(err, "final", False):
                raise
            if attempt == tries:
                raise OSError(f"unreadable after {tries} tries: {err.strerror or err}") from err
            time.sleep(pause_s * attempt)
    raise AssertionError("unreachable")


class ImageReader:
    """One listed image's bytes, wherever it lies: a file of the tree, a byte range of an archive, or a row of a
    Parquet file (row groups read once per run of rows)."""

    def __init__(self, root: str | Path):
        from alexnet.hfparquet import RowGroups

        self.root, self._groups = Path(root), RowGroups(root)

    @staticmethod
    def where(source: str, start: int, length: int) -> str:
        """Where a listed image lies inside its archive or Parquet file, for a reject's reason ('' for a file)."""
        if not source:
            return ""
        if source.endswith(".parquet"):
            return f" [{source}, row group {start}, row {length}]"
        return f" [{source}, bytes {start}..{start + length}]"

    def read(self, path: str, source: str = "", start: int = 0, length: int = 0) -> bytes:
        from alexnet.archives import read_range

        if not source:
            return read_with_retries(fs_path(self.root, path))
        where = self.root / source
        if source.endswith(".parquet"):
            return read_with_retries(where, read=lambda: self._groups.read(source, start, length))
        return read_with_retries(where, read=lambda: read_range(self.root, source, start, length))


def classes_all_rejected(train: pa.Table, rejects: list[tuple[str, str]], wnids: tuple[str, ...]) -> dict[str, int]:
    """{wnid: files} of the classes whose every listed training file was rejected."""
    refused = {path for path, _ in rejects}
    listed: dict[str, list[str]] = {}
    for path, wnid in zip(train["path"].to_pylist(), train["wnid"].to_pylist()):
        listed.setdefault(wnid, []).append(path)
    return {w: len(listed[w]) for w in wnids if listed.get(w) and all(p in refused for p in listed[w])}
