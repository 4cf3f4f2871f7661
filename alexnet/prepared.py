"""The preprocessing output: its file names and formats, written by `alexnet.preprocess`, read by everything else.

    OUT/train/part-NNNNN.parquet, OUT/val/part-NNNNN.parquet   shards (SHARD_SCHEMA)
    OUT/summary.json        written last: the output is finished once it exists
    OUT/classes.json        the class index (sorted train wnids) with names
    OUT/mean_image.npy      (S, S, 3) float32 RGB mean on the 0-255 scale (+ mean_image.png)
    OUT/pca.json            PCA of RGB pixel values scaled to [0, 1]
    OUT/rejects.csv         path,reason of every file not written
    OUT/_work/              per-shard results of an unfinished job; removed when it finishes
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

import alexnet
from alexnet.config import UsageError

SPLITS = ("train", "val")
SUMMARY = "summary.json"
CLASSES = "classes.json"
MEAN_IMAGE = "mean_image.npy"
MEAN_IMAGE_PNG = "mean_image.png"
PCA = "pca.json"
REJECTS = "rejects.csv"
WORK_DIR = "_work"
MARKER = ".alexnet-ray-output"  # written first into a folder preprocessing claims: only such a folder is ever deleted
MARKER_FORMAT = "alexnet-ray preprocessing output"
ROW_GROUP_BYTES = 16 << 20      # bounds a task's memory; far below Parquet's 2 GiB limit
SHARD_SCHEMA = pa.schema([
    ("image", pa.binary()),     # JPEG bytes, size x size RGB
    ("label", pa.int32()),      # index into the sorted train wnids
    ("wnid", pa.string()),
    ("path", pa.string()),      # relative to the input root
])


def shard_name(split: str, shard: int) -> str:
    return f"{split}/part-{shard:05d}.parquet"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write` to a temporary name beside `path`, then rename: readers see the whole file or none."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)


def classes_text(wnids: list[str], names: dict[str, str]) -> str:
    return json.dumps({"classes": [{"index": i, "wnid": w, "name": names.get(w)} for i, w in enumerate(wnids)]},
                      indent=1)


def rejects_text(rejects: list[tuple[str, str]]) -> str:
    return "path,reason\n" + "".join(f"{_csv_field(p)},{_csv_field(r)}\n" for p, r in sorted(rejects))


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def classes_digest(wnids: list[str]) -> str:
    """A short fingerprint of a class list (order matters: it is the label index)."""
    return hashlib.sha1("\n".join(wnids).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Prepared:
    """What training and evaluation need from `pipelines/preprocess.py --output OUT`."""

    path: Path
    size: int
    wnids: list[str]
    mean_image: np.ndarray          # (S, S, 3) float32, 0-255
    eigenvalues: np.ndarray         # (3,), pixels on [0, 1]
    eigenvectors: np.ndarray        # (3, 3), columns
    train_files: list[str]
    val_files: list[str]
    summary: dict

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    @property
    def chroma(self) -> str:
        """Chroma subsampling of the stored JPEGs ("420" for outputs made before --chroma)."""
        return str(self.summary["config"].get("chroma", "420"))

    def class_names(self) -> list[str]:
        """Each class's name (classes.json; the wnid where the input named none), in label order."""
        classes = json.loads((self.path / CLASSES).read_text())["classes"]
        return [c.get("name") or c["wnid"] for c in classes]

    @property
    def val_rows(self) -> int:
        return int(self.summary["rows_written"].get("val", 0))

    def val_fingerprint(self) -> str:
        """Names the validation set a stored output belongs to (shard names, sizes and times, preprocessing run):
        a shard rewritten in place (or copied without its times) is inferred again."""
        h = hashlib.sha1(str(self.summary.get("mlflow_run_id")).encode())
        for f in sorted(self.val_files):
            stat = Path(f).stat()
            h.update(f"{Path(f).name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return h.hexdigest()[:12]


def is_ours(out: Path) -> bool:
    """Whether `out` carries the marker preprocessing writes into every folder it claims."""
    try:
        return json.loads((Path(out) / MARKER).read_text()).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_marker(out: Path, version: str) -> None:
    atomic_write(Path(out) / MARKER, lambda p: p.write_text(json.dumps({"format": MARKER_FORMAT, "version": version})))


LOCK = ".alexnet-ray-lock"


@contextlib.contextmanager
def output_lock(out: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """One job at a time in `out`: OUT/.alexnet-ray-lock (host, pid, start time), released when the job ends.

    A lock left by a dead process of this host is taken over with a message; a live one, or one from another
    host (whose process cannot be checked from here), is a UsageError saying who holds it.
    """
    path = Path(out) / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            who = f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('started', '?')}"
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not psutil.pid_exists(holder["pid"]):
                log(f"taking over {path}: its job ({who}) is no longer running")
                path.unlink(missing_ok=True)
                continue
            raise UsageError(f"another preprocessing job ({who}) is writing {out}; wait for it to end (if it is "
                             f"dead on another machine, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def shard_manifest(out: Path, shards: list[dict], rows: dict[str, int]) -> dict[str, dict[str, int]]:
    """summary.json's record of every shard: {relative name: {rows, bytes}}, checked by `check_shards`."""
    names = [shard_name(s["split"], s["shard"]) for s in shards]
    return {n: {"rows": rows[n], "bytes": (Path(out) / n).stat().st_size} for n in sorted(names)}


def check_shards(path: Path, summary: dict) -> None:
    """UsageError naming the first shard that is missing, extra, resized or unreadable against summary.json.

    Sizes first (a stat each), then row counts from the Parquet footers: a deleted shard would train
    on less data, a stray one on data nobody prepared, a truncated one would end the run mid-epoch.
    """
    manifest = summary.get("shard_files")
    if manifest is None:  # outputs written before the manifest existed: nothing to compare with
        return
    found = {f"{split}/{p.name}" for split in SPLITS for p in (path / split).glob("*.parquet")}
    for name in sorted(set(manifest) - found):
        raise UsageError(f"--data {path}: shard {name} is listed in {SUMMARY} but missing; restore it or "
                         "preprocess again (--overwrite)")
    for name in sorted(found - set(manifest)):
        raise UsageError(f"--data {path}: {name} is not part of this output (not in {SUMMARY}); move it away")
    for name, want in sorted(manifest.items()):
        size = (path / name).stat().st_size
        if size != want["bytes"]:
            raise UsageError(f"--data {path}: shard {name} has {size:,} bytes, {SUMMARY} says {want['bytes']:,}: "
                             "damaged or replaced; preprocess again (--overwrite)")
    for name, want in sorted(manifest.items()):
        try:
            rows = pq.read_metadata(path / name).num_rows
        except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError
            raise UsageError(f"--data {path}: shard {name} is not a readable Parquet file ({err})") from err
        if rows != want["rows"]:
            raise UsageError(f"--data {path}: shard {name} holds {rows} rows, {SUMMARY} says {want['rows']}")


def load_mean_image(path: Path | str) -> np.ndarray:
    """A preprocessing output's mean image, (S, S, 3) float32 on the 0-255 scale. Ray actors read it where they
    run: passed as an argument it would sit in the object store (786 KB at 256 px), and Ray then warns on the
    console that a restarted actor could lose it."""
    return np.load(Path(path) / MEAN_IMAGE).astype(np.float32)


def read_prepared(path: Path) -> Prepared:
    """UsageError with the reason when `path` is not a finished preprocessing output with statistics."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise UsageError(f"--data {path} does not exist")
    if not (path / SUMMARY).is_file():
        if (path / WORK_DIR).is_dir():
            raise UsageError(f"--data {path} is an unfinished preprocessing output: rerun pipelines/preprocess.py "
                             "with the same arguments to complete it")
        raise UsageError(f"--data {path} is not a preprocessing output (no {SUMMARY})")
    summary = json.loads((path / SUMMARY).read_text())
    for name in (MEAN_IMAGE, PCA, CLASSES):
        if not (path / name).is_file():
            raise UsageError(f"--data {path} lacks {name}: preprocess without --no-stats")
    check_shards(path, summary)
    pca = json.loads((path / PCA).read_text())
    train_files = sorted(str(p) for p in (path / "train").glob("*.parquet"))
    if not train_files:
        raise UsageError(f"--data {path} holds no training shards")
    return Prepared(
        path=path, size=int(summary["config"]["size"]),
        wnids=[c["wnid"] for c in json.loads((path / CLASSES).read_text())["classes"]],
        mean_image=load_mean_image(path),
        eigenvalues=np.asarray(pca["eigenvalues"], np.float64),
        eigenvectors=np.asarray(pca["eigenvectors"], np.float64),
        train_files=train_files,
        val_files=sorted(str(p) for p in (path / "val").glob("*.parquet")
                         if summary["rows_written"].get("val", 0) > 0),
        summary=summary,
    )


def check_claimable(out: Path, overwrite: bool) -> None:
    """Refuse, touching nothing, a non-folder, or a non-empty folder that is not ours. A folder is ours only if
    it carries MARKER: a stray summary.json proves nothing."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not is_ours(out):
        raise UsageError(f"output folder {out} is not empty and not a preprocessing output (no {MARKER}; "
                         "outputs written before the marker existed lack it too: delete such a folder yourself); "
                         f"{'--overwrite deletes only folders this project wrote; ' if overwrite else ''}"
                         "choose an empty or new folder")


def prepare_output(out: Path, overwrite: bool) -> None:
    """Claim `out` (new, empty, or ours), clean stale temporaries; --overwrite empties one of ours. The caller
    holds the output's lock (`output_lock`), which --overwrite leaves in place."""
    check_claimable(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for child in out.iterdir():
            if child.name != LOCK:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    elif (out / SUMMARY).exists():
        raise UsageError(f"{out} holds a finished preprocessing output; pass --overwrite to redo it")
    if not is_ours(out):
        write_marker(out, alexnet.__version__)
    for sub in ("train", "val", WORK_DIR):
        (out / sub).mkdir(exist_ok=True)
        for tmp in (out / sub).glob(".*.tmp"):
            tmp.unlink()
