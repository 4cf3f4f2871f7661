"""Joining or starting Ray, and refusing requests the cluster can never satisfy (instead of pending forever)."""

from __future__ import annotations

import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from alexnet.config import Log, UsageError

T = TypeVar("T")
ADDRESS_FILE = "ray_current_cluster"  # in Ray's temp dir, written by `ray start`

# Ray Data 2.60 reads Parquet footers on a pool of FooterReader actors that it starts afresh for
# every pass over a dataset (every epoch, every validation pass): 32 processes by default, ~10 s
# of start-up before each epoch's first batch on a 2-core node.  One actor runs 128 footer reads
# at once, plenty for thousands of shards.  A value already in the environment wins.
RAY_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def job_runtime_env(address: str | None = None) -> dict:
    """runtime_env for ray.init: RAY_DATA_ENV in every task and actor of the job (and in this process).

    With `address` (the job's GCS address), also RAY_ADDRESS: Ray's helpers that look for "the" cluster
    without being told (the state API behind Ray Train's placement-group cleaner) then find this job's
    cluster, not "multiple active Ray instances" when another one runs on the same machine.
    """
    env = {k: os.environ.get(k, v) for k, v in RAY_DATA_ENV.items()}
    if address and "://" not in address:
        env["RAY_ADDRESS"] = address
    os.environ.update(env)
    return {"env_vars": env}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_local_ray(num_cpus: int, **init_kwargs) -> str:
    """A new local Ray instance that every process of the job can tell from any other on this machine.

    Its GCS port is chosen here (RAY_GCS_SERVER_PORT) so that its address is known before it starts
    and travels in the job's runtime env (`job_runtime_env`); returns that address.
    """
    import ray

    address = f"{ray.util.get_node_ip_address()}:{_free_port()}"
    before = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = address.rsplit(":", 1)[1]
    try:
        ray.init(address="local", num_cpus=num_cpus, runtime_env=job_runtime_env(address), **init_kwargs)
    finally:
        if before is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = before
    actual = ray.get_runtime_context().gcs_address
    if actual != address:  # should not happen: say so rather than point the job at another cluster
        raise RuntimeError(f"the local Ray instance listens at {actual}, not at {address} as requested")
    return address


def node_cluster_address() -> str | None:
    """The GCS address of the cluster that `ray start` last started or joined on this node, if any.

    `ray start` writes it to Ray's temp dir ($RAY_TMPDIR, else $TMPDIR, else /tmp, then ray/); a
    cluster stopped uncleanly leaves it behind, so it may name a dead cluster.
    """
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        return (Path(base) / "ray" / ADDRESS_FILE).read_text().strip() or None
    except OSError:
        return None


def _answers(address: str, timeout_s: float = 3.0) -> bool:
    """Whether something listens at a host:port GCS address (client and http addresses are taken as given)."""
    if "://" in address:
        return True
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
        return True
    except (OSError, ValueError):
        return False


def resolve_address(address: str | None, log: Log = print) -> str | None:
    """The cluster to join, or None for a new local instance; Ray's own order, without its endless retries.

    `--address host:port` (or ray://...) joins that cluster and fails at once when nothing answers there;
    `local` starts a new instance; unset (or `auto`) takes $RAY_ADDRESS (set by Ray's job submission
    for the job's driver), else the cluster `ray start` runs on this node. A dead one found that way is
    reported and skipped; unset then falls back to a new local instance, `auto` fails.
    """
    if address == "local":
        return None
    if address and address != "auto":
        if not _answers(address):
            raise UsageError(f"no Ray cluster answers at --address {address}")
        return address
    for found, source in ((os.environ.get("RAY_ADDRESS"), "$RAY_ADDRESS"),
                          (node_cluster_address(), "the address file of `ray start` on this node")):
        if found and _answers(found):
            return found
        if found:
            log(f"Ray: no cluster answers at {found} (from {source}); ignoring it")
    if address == "auto":
        raise UsageError("--address auto: no running Ray cluster found ($RAY_ADDRESS unset or dead, no `ray start` "
                         "on this node); pass --address host:port, or leave it out to start a local instance")
    return None


def connect_ray(address: str | None, min_cpus: float = 0, log: Log = print) -> None:
    """Join the cluster `resolve_address` finds, or start a local Ray with at least `min_cpus` logical CPUs.

    A local start may advertise more CPUs than the machine has: two training workers plus Ray
    Data's decoding tasks then share the cores instead of waiting for each other. A joined
    cluster's resources are its own: they are never set from here.
    """
    import ray

    from alexnet.console import keep_quiet, quiet

    if not ray.is_initialized():
        target = resolve_address(address, log)
        if target is None:
            start_local_ray(max(os.cpu_count() or 1, int(-(-min_cpus // 1))), log_to_driver=not quiet())
        else:
            try:
                ray.init(address=target, log_to_driver=not quiet(), runtime_env=job_runtime_env(target))
            except ConnectionError as exc:
                if _refused_token(exc):
                    raise UsageError(_token_hint(target)) from exc
                raise
        keep_quiet()
        total = ray.cluster_resources()
        where = f"joined the cluster at {target}" if target else "started a local instance"
        log(f"Ray: {where}: {len(_alive_nodes())} node(s), {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU")
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def _refused_token(exc: BaseException) -> bool:
    """Whether a failed ray.init was the cluster refusing this process's token (or its lack of one)."""
    from ray.exceptions import AuthenticationError

    while exc is not None:
        if isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _token_hint(address: str) -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return (f"the Ray cluster at {address} refused this process's token: give it the cluster's token in "
                "RAY_AUTH_TOKEN (or the file ~/.ray/auth_token); `ray get-auth-token` on its head node prints it")
    return (f"the Ray cluster at {address} uses token authentication: set RAY_AUTH_MODE=token and the cluster's "
            "token in RAY_AUTH_TOKEN (or the file ~/.ray/auth_token); `ray get-auth-token` on its head node prints it")


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def worker_capacity(per_worker: dict[str, float]) -> int:
    """How many workers of `per_worker` resources the live nodes hold at once (each on one node)."""
    need = {k: v for k, v in per_worker.items() if v > 0}
    if not need:
        return 10**6
    return sum(min(int(r.get(k, 0.0) // v) for k, v in need.items()) for r in _alive_nodes())


def check_resources(per_worker: dict[str, float], num_workers: int, spare_cpus: float = 0.0) -> None:
    """UsageError naming what is missing when the live nodes cannot hold `num_workers` workers.

    Each worker's resources must fit on one node; `spare_cpus` must remain for other tasks
    (Ray Data's decoding) once every worker is placed.
    """
    nodes = _alive_nodes()
    need = {k: v for k, v in per_worker.items() if v > 0}
    largest = {key: max((r.get(key, 0.0) for r in nodes), default=0.0) for key in need}
    short = [key for key, amount in need.items() if largest[key] < amount]
    if short:  # every shortfall at once, not one per attempt
        raise UsageError(f"one worker needs {_fmt({k: need[k] for k in short})} on a single node, but the largest "
                         f"node of this cluster has {_fmt({k: largest[k] for k in short})} (nodes: {len(nodes)})")
    capacity = worker_capacity(per_worker)
    if capacity < num_workers:
        raise UsageError(f"this cluster holds at most {capacity} worker(s) of {_fmt(need)}, "
                         f"but --num-workers is {num_workers}")
    left = sum(r.get("CPU", 0.0) for r in nodes) - num_workers * per_worker.get("CPU", 0.0)
    if left < spare_cpus:
        raise UsageError(f"the workers take all CPUs of the cluster, leaving {left:g}: at least {spare_cpus:g} "
                         "must remain for Ray Data's decoding tasks (lower --cpus-per-worker or add a node)")


# Ray Train reads this in the driver and passes it on to its controller (ray.train.v2 constants)
WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def bound_worker_wait(seconds: float | None) -> None:
    """How long Ray Train's next worker group may wait for its resources: `seconds`, or Ray's own (None).

    Set in this process before `fit()`; Ray Train hands it to the run's controller.
    """
    if seconds is None:
        os.environ.pop(WORKER_GROUP_START_TIMEOUT, None)
    else:
        os.environ[WORKER_GROUP_START_TIMEOUT] = f"{seconds:g}"


def waited_too_long(err: BaseException) -> bool:
    """Whether a failed Ray Train run ended because its worker group never got its resources."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ == "WorkerGroupStartupTimeoutError":
            return True
        err = getattr(err, "controller_failure", None) or err.__cause__ or err.__context__
    return False


def wait_message(per_worker: dict[str, float], num_workers: int, seconds: float) -> str:
    """What a run waited for and what the cluster has, total and free, for a run that gave up waiting."""
    import ray

    need = {k: v for k, v in per_worker.items() if v > 0}
    keys = list(need) or ["CPU"]
    total, free = ray.cluster_resources(), ray.available_resources()
    return (f"waited {seconds:g} s for {num_workers} worker(s) of {_fmt(need)} and the cluster did not grant "
            f"them: it has {_fmt({k: total.get(k, 0.0) for k in keys})} in all, "
            f"{_fmt({k: free.get(k, 0.0) for k in keys})} free now ({len(_alive_nodes())} node(s)); other jobs "
            "hold the rest. Wait for them, lower --num-workers / --cpus-per-worker, or raise --resource-wait-s "
            "(--no-check-resources waits without a limit, for autoscaling clusters)")


def watched(results: Iterable[T], seconds: float, need: dict[str, float], what: str) -> Iterator[T]:
    """`results` (a driver's loop over a Ray Data job), failing when the cluster never runs the job.

    The results are pulled on a helper thread; when nothing has come for `seconds` while the cluster has
    less free than one of the job's tasks needs (`need`), a UsageError says what the job waited for and
    what the cluster has. A slow job on a cluster with room never trips it. (No signals: Ray Train and
    Tune install SIGINT handlers of their own in the driver.)
    """
    import ray

    if seconds <= 0:
        raise UsageError(f"--resource-wait-s must be > 0, got {seconds:g}")
    need = {k: v for k, v in need.items() if v > 0}
    box: queue.Queue = queue.Queue(maxsize=4)

    def pump() -> None:
        try:
            for result in results:
                box.put(("result", result))
            box.put(("end", None))
        except BaseException as err:  # noqa: BLE001 - handed to the consuming thread
            box.put(("error", err))

    threading.Thread(target=pump, name="ray-data-results", daemon=True).start()
    last = time.monotonic()
    while True:
        try:
            kind, value = box.get(timeout=min(1.0, seconds / 4))
        except queue.Empty:
            free = ray.available_resources()
            if time.monotonic() - last > seconds and any(free.get(k, 0.0) < v for k, v in need.items()):
                total = ray.cluster_resources()
                message = (f"waited {seconds:g} s for {what} ({_fmt(need)} each) without a result: the cluster "
                           f"has {_fmt({k: total.get(k, 0.0) for k in need})} in all, "
                           f"{_fmt({k: free.get(k, 0.0) for k in need})} free now ({len(_alive_nodes())} node(s)); "
                           "other jobs hold the rest. Wait for them or raise --resource-wait-s")
                raise UsageError(message) from None
            continue
        if kind == "end":
            return
        if kind == "error":
            raise value
        last = time.monotonic()
        yield value
