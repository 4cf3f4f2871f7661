"""The quiet console: what Ray's C++ core writes to the driver's stderr goes to the job's log file, while the
project's own lines, printed to stdout and to Python's stderr, stay on the terminal; --verbose leaves both."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

JOB = textwrap.dedent("""
    import os, sys
    from alexnet.console import job_console
    with job_console("check", verbose={verbose}, log=print) as path:
        os.write(2, b"native noise from the C++ core\\n")
        print("project line on stdout", flush=True)
        print("project line on stderr", file=sys.stderr, flush=True)
    print("after:", path, flush=True)
    os.write(2, b"fd 2 is the terminal again\\n")
""")


def _run(verbose: bool) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", JOB.format(verbose=verbose)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout, done.stderr


def test_native_stderr_goes_to_the_log_file_and_the_projects_lines_stay():
    out, err = _run(verbose=False)
    assert "project line on stdout" in out and "project line on stderr" in err
    assert "native noise" not in err and "fd 2 is the terminal again" in err
    log = Path(out.split("after: ")[1].split()[0])
    assert "native noise from the C++ core" in log.read_text()


def test_verbose_leaves_native_stderr_on_the_terminal():
    out, err = _run(verbose=True)
    assert "native noise from the C++ core" in err and "project line on stderr" in err and "after: None" in out
