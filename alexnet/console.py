"""A console a person can read: by default only the project's own lines reach the terminal.

Ray's and MLflow's log records, Python warnings and what Ray's C++ core writes to the driver's stderr go to one
file per job (named once, at the start); the
output of Ray's worker processes stays in Ray's session logs (`log_to_driver` off); the lines the project
prints from inside Ray (a training run's epoch lines, printed in the Ray Train controller) travel to the
driver through a `Relay`. `--verbose` leaves everything as Ray and MLflow have it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from alexnet.config import Log

LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "py.warnings")
_state: dict = {"quiet": False, "handler": None}


def quiet() -> bool:
    """Whether this job keeps Ray's and MLflow's output off the terminal (`alexnet.cluster` asks)."""
    return _state["quiet"]


def _to_file(handler: logging.Handler) -> list[tuple]:
    """Point the third-party loggers at `handler` alone (their own file handlers kept); what to put back."""
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        kept = [h for h in logger.handlers if isinstance(h, logging.FileHandler)
                or not isinstance(h, logging.StreamHandler)]  # Ray Data's session file handler is no stream
        logger.handlers = kept + [handler]
        logger.propagate = False
    return saved


def _native_stderr_to(path: Path) -> Callable[[], None]:
    """File descriptor 2 into the log file: Ray's C++ core worker in the driver writes its errors and warnings
    there (e.g. "Actor ... has constructor arguments in the object store"), past Python's logging. Python's own
    sys.stderr keeps the terminal when it is file descriptor 2 (when it is not, e.g. under pytest's capture, it
    is not touched). Returns what puts both back."""
    try:
        python_writes_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        python_writes_fd2 = False
    sys.stderr.flush()
    terminal = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    before = sys.stderr
    if python_writes_fd2:
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(terminal), "wb", buffering=0), encoding=before.encoding,
                                      errors="backslashreplace", line_buffering=True, write_through=True)

    def put_back() -> None:
        if python_writes_fd2:
            sys.stderr.flush()
            sys.stderr.close()
        sys.stderr = before
        os.dup2(terminal, 2)
        os.close(terminal)

    return put_back


def keep_quiet() -> None:
    """Again, after `ray.init`: it configures Ray's loggers anew."""
    if _state["quiet"]:
        _to_file(_state["handler"])


@contextlib.contextmanager
def job_console(stage: str, verbose: bool, log: Log = print) -> Iterator[Path | None]:
    """The job's console: quiet unless `verbose`; yields the log file (None when verbose)."""
    if verbose or _state["quiet"]:  # verbose, or an enclosing job already made it quiet
        yield None
        return
    import mlflow  # noqa: F401 - they set up their loggers on import: after that, they are ours to redirect
    import ray  # noqa: F401
    import ray.data  # noqa: F401

    folder = Path(tempfile.gettempdir()) / "alexnet-ray"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = _to_file(handler)
    logging.captureWarnings(True)
    _state.update(quiet=True, handler=handler)
    native = _native_stderr_to(path)
    log(f"logs of Ray and MLflow: {path}; of Ray's processes: Ray's session logs (/tmp/ray/session_latest/logs "
        "on a local instance); --verbose shows them here")
    try:
        yield path
    finally:
        native()
        _state.update(quiet=False, handler=None)
        logging.captureWarnings(False)
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()


class Relay:
    """Lines said inside Ray (any node) printed by the driver: a Ray queue on the driver's node (a lost node never
    takes it along), drained by a driver thread. A line that cannot travel is printed where it was said."""

    def __init__(self):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def say(self, line: str) -> None:
        try:
            self.queue.put(line, timeout=10)
        except Exception:  # noqa: BLE001 - the console must never stop a training run
            print(line, flush=True)

    @contextlib.contextmanager
    def printing(self, log: Log) -> Iterator[None]:
        """While the block runs, and once more after it, every line said is passed to `log` in order."""
        from ray.util.queue import Empty

        stop = threading.Event()

        def drain(wait_s: float) -> bool:
            """False once the queue is gone."""
            while True:
                try:
                    log(self.queue.get(timeout=wait_s))
                except Empty:
                    return True
                except Exception:  # noqa: BLE001 - the queue's actor died with its node: nothing more to print
                    return False

        def run() -> None:
            while not stop.is_set() and drain(0.5):
                pass

        thread = threading.Thread(target=run, daemon=True, name="console-relay")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            if drain(0.2):
                self.queue.shutdown()
