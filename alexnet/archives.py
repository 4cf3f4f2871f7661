"""ImageNet as image-net.org ships it, read in place: no member is ever extracted to disk.

    ILSVRC2012_img_train.tar       a tar of per-class tars <wnid>.tar, each holding <wnid>_<n>.JPEG
    ILSVRC2012_img_val.tar         flat ILSVRC2012_val_<8 digits>.JPEG
    ILSVRC2012_devkit_t12.tar.gz   data/ILSVRC2012_validation_ground_truth.txt (an ILSVRC2012_ID per val image,
                                   in file-name order) and data/meta.mat (ILSVRC2012_ID -> WNID)

A member is found by its byte range in the archive (tar headers give the offset of each member's data), and
read by range by whichever task decodes it.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexnet.config import UsageError

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"  # .tar.gz as downloaded, or the folder it extracts to
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")


@dataclass(frozen=True)
class Archives:
    """What the tar headers and the devkit say, read on the driver before any Ray work."""

    class_tars: tuple[tuple[str, int, int], ...]  # (wnid, data offset, size) of each <wnid>.tar in TRAIN_TAR
    val: tuple[tuple[str, int, int, str], ...]    # (member name, data offset, size, wnid or "") in VAL_TAR
    rejects: tuple[tuple[str, str], ...]          # (path, reason) found while reading the headers
    hidden: int                                   # members named .* (e.g. macOS ._ files): skipped
    names: dict[str, str]                         # wnid -> class name, from meta.mat


def is_archives(root: Path) -> bool:
    return (Path(root) / TRAIN_TAR).is_file()


class Window(io.RawIOBase):
    """The bytes [start, start + size) of an open binary file, as a seekable read-only file."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._size - self._pos))
        data = os.pread(self._f.fileno(), n, self._start + self._pos)
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _open_tar(path: Path, fileobj=None) -> tarfile.TarFile:
    try:
        return tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except (tarfile.TarError, OSError) as err:
        raise UsageError(f"{path} is not an uncompressed tar archive ({err}); the ILSVRC2012 image archives are "
                         "read in place and must be the .tar files as downloaded") from err


NOT_REGULAR = "not a regular file inside the archive (a link or device entry)"


def _members(tar: tarfile.TarFile, where: str):
    """(member, kind) in archive order, folders left out; kind "file", "hidden" or why it is no image. An archive
    that breaks off ends with (None, why): the members before the break are kept."""
    found = 0
    try:
        for m in tar:
            if m.isdir():
                continue
            found += 1
            name = m.name.rsplit("/", 1)[-1]
            yield m, ("hidden" if name.startswith(".") else "file" if m.isreg() else NOT_REGULAR)
    except (tarfile.TarError, OSError, EOFError) as err:
        yield None, f"{where} ends or breaks after {found} member(s): {err}"


def read_archives(root: Path) -> Archives:
    """The train tar's class tars and the val tar's labelled members; every problem is a one-line UsageError."""
    root = Path(root)
    rejects, hidden, class_tars = [], 0, []
    with _open_tar(root / TRAIN_TAR) as tar:
        for m, kind in _members(tar, TRAIN_TAR):
            if m is None:
                rejects.append((f"train/{TRAIN_TAR}", kind))
            elif kind == "hidden":
                hidden += 1
            elif kind == "file" and m.name.endswith(".tar"):
                class_tars.append((Path(m.name).stem, m.offset_data, m.size))
            else:
                rejects.append((f"train/{m.name}", f"not a per-class <wnid>.tar inside {TRAIN_TAR}"))
    if not class_tars:
        raise UsageError(f"{root / TRAIN_TAR} holds no per-class <wnid>.tar archives")
    with open(root / TRAIN_TAR, "rb") as f:  # a tar without members starts with a zero block
        empty = [w for w, offset, size in class_tars if not os.pread(f.fileno(), 512, offset).strip(b"\0")]
    if empty:
        raise UsageError(f"{len(empty)} empty class archive(s) in {root / TRAIN_TAR}: "
                         f"{', '.join(f'{w}.tar' for w in empty[:5])}{' ...' if len(empty) > 5 else ''}")
    val: list[tuple[str, int, int, str]] = []
    names: dict[str, str] = {}
    if (root / VAL_TAR).is_file():
        truth, id_to_wnid, names = read_devkit(root)
        members = []
        with _open_tar(root / VAL_TAR) as tar:
            for m, kind in _members(tar, VAL_TAR):
                if m is None:
                    rejects.append((f"val/{VAL_TAR}", kind))
                elif kind == "hidden":
                    hidden += 1
                elif kind == "file":
                    members.append((m.name, m.offset_data, m.size))
                else:
                    rejects.append((f"val/{m.name}", kind))
        members.sort()
        numbered = all(_VAL_NAME.fullmatch(name) for name, _, _ in members)
        # Line k of the ground truth labels ILSVRC2012_val_<k>; a partial val tar keeps its images' lines.
        lines = [int(_VAL_NAME.fullmatch(name)[1]) - 1 for name, _, _ in members] if numbered else range(len(members))
        if members and max(lines) >= len(truth):
            raise UsageError(f"{GROUND_TRUTH} of the devkit has {len(truth)} lines but {VAL_TAR} holds "
                             f"{len(members)} images{' up to number ' + str(max(lines) + 1) if numbered else ''}")
        for (name, offset, size), line in zip(members, lines):
            wnid = id_to_wnid.get(truth[line], "")
            if not wnid:
                rejects.append((f"val/{name}", f"ILSVRC2012_ID {truth[line]} (ground-truth line {line + 1}) is "
                                               f"not a leaf synset in {META}"))
                continue
            val.append((name, offset, size, wnid))
    return Archives(tuple(sorted(class_tars)), tuple(val), tuple(rejects), hidden, names)


def read_devkit(root: Path) -> tuple[list[int], dict[int, str], dict[str, str]]:
    """(ground-truth IDs in file-name order, {ILSVRC2012_ID: wnid} of the leaf synsets, {wnid: name})."""
    folder, packed = root / DEVKIT, root / f"{DEVKIT}.tar.gz"
    wanted = {GROUND_TRUTH: None, META: None}
    if folder.is_dir():
        for rel in wanted:
            if (folder / rel).is_file():
                wanted[rel] = (folder / rel).read_bytes()
    elif packed.is_file():
        try:
            with tarfile.open(packed, "r:*") as tar:
                for m in tar:
                    for rel in wanted:
                        if m.isreg() and (m.name == rel or m.name.endswith("/" + rel)):
                            wanted[rel] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UsageError(f"cannot read the devkit {packed}: {err}") from err
    else:
        raise UsageError(f"{root / VAL_TAR} needs the devkit for its labels: {packed} (or the folder {folder}) "
                         "is missing")
    where = folder if folder.is_dir() else packed
    for rel, data in wanted.items():
        if data is None:
            raise UsageError(f"the devkit {where} has no {rel}")
    try:
        truth = [int(line) for line in wanted[GROUND_TRUTH].decode().split()]
    except (UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{where}: {GROUND_TRUTH} must hold one integer ILSVRC2012_ID per line ({err})") from err
    id_to_wnid, names = _read_meta(wanted[META], where)
    return truth, id_to_wnid, names


def _read_meta(data: bytes, where: Path) -> tuple[dict[int, str], dict[str, str]]:
    """meta.mat's `synsets` struct (a MATLAB v5 file: scipy parses it as data, nothing is executed)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        ids, wnids, words, children = (np.atleast_1d(synsets[f]) for f in
                                       ("ILSVRC2012_ID", "WNID", "words", "num_children"))
    except Exception as err:  # noqa: BLE001 - scipy raises many types for a file that is not such a table
        raise UsageError(f"{where}: {META} is not the devkit's synsets table ({type(err).__name__}: {err})") from err
    leaves = [(int(i), str(w), str(n)) for i, w, n, c in zip(ids, wnids, words, children) if int(c) == 0]
    return {i: w for i, w, _ in leaves}, {w: n for _, w, n in leaves}


def list_class_tars_batch(batch: dict[str, np.ndarray], root: str) -> dict[str, list]:
    """Ray Data task: the members of a batch of per-class tars, as byte ranges of the train tar."""
    out: dict[str, list] = {"split": [], "path": [], "wnid": [], "kind": [], "source": [], "start": [],
                            "length": []}

    def add(path, wnid, kind, start=0, length=0):
        for key, value in zip(out, ("train", path, wnid, kind, TRAIN_TAR, start, length)):
            out[key].append(value)

    with open(Path(root) / TRAIN_TAR, "rb") as f:
        for wnid, offset, size in zip(batch["wnid"], batch["start"], batch["length"]):
            try:
                tar = tarfile.open(fileobj=Window(f, int(offset), int(size)), mode="r:")
            except (tarfile.TarError, OSError, EOFError) as err:
                add(f"train/{wnid}.tar", wnid, f"{wnid}.tar in {TRAIN_TAR} is not a readable tar: {err}")
                continue
            with tar:
                for m, kind in _members(tar, f"{wnid}.tar in {TRAIN_TAR}"):
                    if m is None:
                        add(f"train/{wnid}.tar", wnid, kind)
                    else:
                        add(f"train/{wnid}/{m.name}", wnid, kind, int(offset) + m.offset_data, m.size)
    return out


def read_range(root: str | Path, source: str, start: int, length: int) -> bytes:
    """One member's bytes, read by range from its archive."""
    with open(Path(root) / source, "rb") as f:
        data = os.pread(f.fileno(), length, start)
    if len(data) != length:
        raise TruncatedMember(f"truncated member: only {len(data)} of its {length} bytes are in the archive")
    return data


class TruncatedMember(OSError):
    """The archive ends inside the member: reading again will not help."""

    final = True
