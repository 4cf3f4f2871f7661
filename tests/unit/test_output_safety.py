"""--overwrite deletes only folders preprocessing claimed (its marker), and never an input inside the output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from alexnet.config import UsageError
from alexnet.imagenet import detect_layout
from alexnet.prepared import prepare_output
from alexnet.prepared import MARKER, is_ours
from alexnet.sample import SampleConfig, make_sample


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_a_stray_summary_json_is_never_deleted(tmp_path, overwrite):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (out / "thesis.tex").write_text("\\documentclass{article}")
    (out / "_work").mkdir()
    before = _files(out)
    with pytest.raises(UsageError, match="not a preprocessing output"):
        prepare_output(out, overwrite=overwrite)
    assert _files(out) == before and (out / "thesis.tex").read_text().startswith("\\documentclass")


def test_an_output_of_ours_is_emptied_by_overwrite_and_refused_without(tmp_path):
    out = tmp_path / "prepared"
    prepare_output(out, overwrite=False)  # a new folder is claimed: the marker comes first
    assert is_ours(out) and (out / "train").is_dir()
    (out / "summary.json").write_text("{}")
    (out / "train" / "part-00000.parquet").write_bytes(b"old")
    with pytest.raises(UsageError, match="finished preprocessing output; pass --overwrite"):
        prepare_output(out, overwrite=False)
    prepare_output(out, overwrite=True)
    assert is_ours(out) and not (out / "summary.json").exists() and not any((out / "train").iterdir())


def test_a_forged_or_foreign_marker_does_not_make_a_folder_ours(tmp_path):
    (tmp_path / MARKER).write_text('{"format": "something else"}')
    (tmp_path / "notes.txt").write_text("mine")
    assert not is_ours(tmp_path)
    with pytest.raises(UsageError):
        prepare_output(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_an_input_inside_the_output_is_refused_before_anything_is_touched(tmp_path):
    out = tmp_path / "out"
    make_sample(SampleConfig(output=out / "imagenet", num_classes=2, train_per_class=2, val_per_class=1))
    before = _files(out)
    with pytest.raises(UsageError, match="lies inside the output"):
        detect_layout(out / "imagenet", out)
    assert _files(out) == before


def test_a_second_job_on_the_same_output_is_refused_while_the_first_holds_the_lock(tmp_path):
    from alexnet.prepared import LOCK, output_lock

    with output_lock(tmp_path, log=lambda _: None):
        lock = json.loads((tmp_path / LOCK).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname() and lock["started"]
        with pytest.raises(UsageError, match=rf"another preprocessing job \({lock['host']} pid {os.getpid()} since"):
            with output_lock(tmp_path, log=lambda _: None):
                pass
        assert (tmp_path / LOCK).exists()  # the refused job did not remove the holder's lock
    assert not (tmp_path / LOCK).exists()  # released when the job ends


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_message(tmp_path):
    from alexnet.prepared import LOCK, output_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))
    said = []
    with output_lock(tmp_path, log=said.append):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert said == [f"taking over {tmp_path / LOCK}: its job ({socket.gethostname()} pid {dead.pid} since then) "
                    "is no longer running"]


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    from alexnet.prepared import LOCK, output_lock

    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(UsageError, match="elsewhere pid 1 since then"):
        with output_lock(tmp_path, log=lambda _: None):
            pass
