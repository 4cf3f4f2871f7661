"""ImageNet as the Hugging Face `imagenet-1k` release ships it, read in place as Parquet.

    classes.py                              IMAGENET2012_CLASSES = OrderedDict({wnid: names, ...}) in label order
    data/train-00000-of-00294.parquet       rows: image = struct{bytes, path}, label (int64)
    data/validation-00000-of-00028.parquet
    data/test-00000-of-00056.parquet        labels -1: not read, counted

A row is found by (file, row group, row); a shard task reads the `image.bytes` column of each row group it
needs once.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alexnet.config import UsageError

CLASSES_PY = "classes.py"
CLASSES_NAME = "IMAGENET2012_CLASSES"
SPLIT_OF = {"train": "train", "validation": "val", "test": None}  # file-name prefix -> our split (None: skipped)
_FILE = re.compile(r"(train|validation|test)-.*\.parquet")


@dataclass(frozen=True)
class HfRelease:
    """The snapshot's Parquet files and classes, checked on the driver from footers and classes.py only."""

    files: tuple[tuple[str, str], ...]  # (our split, path relative to the root), sorted
    label_wnids: tuple[str, ...]        # label -> wnid, classes.py's order
    names: dict[str, str]               # wnid -> class names
    test_rows: int                      # rows of the test split: labels -1, not read


def parquet_files(root: Path) -> list[Path]:
    root = Path(root)
    return sorted(p for folder in (root / "data", root) if folder.is_dir() for p in folder.glob("*.parquet"))


def is_hf_release(root: Path) -> bool:
    return any(_FILE.fullmatch(p.name) for p in parquet_files(root))


def read_release(root: Path) -> HfRelease:
    root = Path(root)
    label_wnids, names = read_classes_py(root / CLASSES_PY)
    files, test_rows = [], 0
    for path in parquet_files(root):
        match = _FILE.fullmatch(path.name)
        if match is None:
            raise UsageError(f"{path}: not a train-/validation-/test-*.parquet file of the imagenet-1k release; "
                             "move it out of the snapshot folder")
        try:
            meta = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as err:
            raise UsageError(f"cannot read the Parquet footer of {path}: {err}") from err
        schema = meta.schema_arrow
        image = schema.field("image").type if "image" in schema.names else None
        has_bytes = image is not None and pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
        if not has_bytes or "label" not in schema.names or not pa.types.is_integer(schema.field("label").type):
            raise UsageError(f"{path}: expected the columns image (struct with bytes, path) and label (integer), "
                             f"found {', '.join(f'{f.name} ({f.type})' for f in schema)}")
        split = SPLIT_OF[match[1]]
        if split is None:
            test_rows += meta.metadata.num_rows
        else:
            files.append((split, str(path.relative_to(root))))
    if not any(split == "train" for split, _ in files):
        raise UsageError(f"{root} has no train-*.parquet files (expected data/train-NNNNN-of-NNNNN.parquet)")
    return HfRelease(tuple(files), label_wnids, names, test_rows)


def read_classes_py(path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """IMAGENET2012_CLASSES from classes.py, parsed as a literal: the file is never imported or executed."""
    if not path.is_file():
        raise UsageError(f"{path} is missing: the imagenet-1k snapshot's classes.py maps labels to wnids")
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"cannot parse {path}: {err}") from err
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == CLASSES_NAME for t in targets) and node.value is not None:
            value = node.value
            if isinstance(value, ast.Call) and len(value.args) == 1:  # OrderedDict({...}) or OrderedDict([...])
                value = value.args[0]
            try:
                classes = dict(ast.literal_eval(value))
            except (ValueError, TypeError, SyntaxError) as err:
                raise UsageError(f"{path}: {CLASSES_NAME} is not a literal {{wnid: names}} ({err})") from err
            if not classes or not all(isinstance(w, str) for w in classes):
                raise UsageError(f"{path}: {CLASSES_NAME} holds no wnid -> names entries")
            return tuple(classes), {w: str(n) for w, n in classes.items()}
    raise UsageError(f"{path} defines no {CLASSES_NAME} = OrderedDict({{wnid: names}})")


def list_parquet_batch(batch: dict[str, np.ndarray], root: str, label_wnids: list[str]) -> pa.Table:
    """Ray Data task: the rows of a batch of Parquet files from their `image.path` and `label` columns alone.

    A row's path is the extracted tree's (train/<wnid>/<name>, val/<name>), so both outputs are alike; a row
    whose label is outside classes.py's range gets that as its `kind` (the reject's reason) and no wnid.
    """
    wnids = pa.array(label_wnids)
    tables = []
    for split, rel in zip(batch["split"], batch["source"]):
        f = pq.ParquetFile(Path(root) / rel)
        for group in range(f.metadata.num_row_groups):
            t = f.read_row_group(group, columns=["image.path", "label"])
            n = t.num_rows
            if n == 0:
                continue
            labels = pc.cast(t["label"], pa.int64()).combine_chunks()
            valid = pc.fill_null(pc.and_(pc.greater_equal(labels, 0), pc.less(labels, len(label_wnids))), False)
            wnid = pc.if_else(valid, pc.take(wnids, pc.if_else(valid, labels, 0)), "")
            kind = pc.if_else(valid, "file", pc.binary_join_element_wise(
                "label ", pc.fill_null(pc.cast(labels, pa.string()), "null"),
                f" is outside classes.py's labels 0..{len(label_wnids) - 1}", ""))
            name = pc.replace_substring_regex(pc.struct_field(t["image"], "path").combine_chunks(), ".*/", "")
            if name.null_count:  # no file name stored: the row's place names it
                name = pc.if_else(pc.is_null(name), pa.array([f"{Path(rel).stem}-{group}-{r}" for r in range(n)]),
                                  name)
            folder = (pc.if_else(valid, pc.binary_join_element_wise("train/", wnid, "/", ""), "train/")
                      if split == "train" else pa.array([f"{split}/"] * n))
            tables.append(pa.table({
                "split": pa.array([split] * n), "path": pc.binary_join_element_wise(folder, name, ""),
                "wnid": wnid, "kind": kind, "source": pa.array([rel] * n),
                "start": pa.array(np.full(n, group, np.int64)), "length": pa.array(np.arange(n, dtype=np.int64))}))
    if not tables:  # files without rows
        from alexnet.imagenet import LISTING_SCHEMA

        return LISTING_SCHEMA.empty_table()
    return pa.concat_tables(tables)


class RowGroups:
    """`image.bytes` of the row groups a shard task reads, the last few kept (a shard reads them in runs)."""

    def __init__(self, root: str | Path, keep: int = 2):
        self._root, self._keep, self._cache = Path(root), keep, {}

    def read(self, source: str, group: int, row: int) -> bytes:
        key = (source, group)
        if key not in self._cache:
            if len(self._cache) >= self._keep:
                self._cache.pop(next(iter(self._cache)))
            try:
                table = pq.ParquetFile(self._root / source).read_row_group(group, columns=["image.bytes"])
            except pa.ArrowException as err:  # a damaged file: its rows are rejects with this reason
                raise OSError(f"cannot read row group {group} of {source}: {err}") from err
            self._cache[key] = pc.struct_field(table["image"], "bytes").combine_chunks()
        return self._cache[key][row].as_py() or b""
