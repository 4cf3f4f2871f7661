"""How an entry point ends when its job does not: one line on stderr and an exit code per kind."""

from __future__ import annotations

import sys
from typing import Any, Callable

USAGE_EXIT = 2
INTERRUPTED_EXIT = 130


class UsageError(ValueError):
    """Wrong input from the user: reported in one line, exit code 2, before any Ray work."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) ended the job: its MLflow runs are KILLED, its state resumable; exit code 130."""


def run_job(job: Callable[..., Any], cfg: Any) -> tuple[Any, int | None]:
    """(what `job(cfg)` returned, None), or (None, exit code) once the reason is printed: a UsageError is exit 2,
    Ctrl-C (Interrupted) 130. The console is quiet unless `cfg.verbose` (`alexnet.console`)."""
    from alexnet.console import job_console

    try:
        with job_console(job.__name__.removeprefix("run_"), getattr(cfg, "verbose", False)):
            return job(cfg), None
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, USAGE_EXIT
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return None, INTERRUPTED_EXIT
