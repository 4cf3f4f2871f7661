"""Joining or starting Ray, and refusing requests the cluster can never satisfy (instead of pending forever)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from alexnet.config import Log, UsageError

ADDRESS_FILE = "ray_current_cluster"  # in Ray's temp dir, written by `ray start`

# Ray Data 2.60 reads Parquet footers on a pool of FooterReader actors that it starts afresh for
# every pass over a dataset (every epoch, every validation pass): 32 processes by default, ~10 s
# of start-up before each epoch's first batch on a 2-core node.  One actor runs 128 footer reads
# at once, plenty for thousands of shards.  A value already in the environment wins.
RAY_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def job_runtime_env() -> dict:
    """runtime_env for ray.init: RAY_DATA_ENV in every task and actor of the job (and in this process)."""
    env = {k: os.environ.get(k, v) for k, v in RAY_DATA_ENV.items()}
    os.environ.update(env)
    return {"env_vars": env}


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

    if not ray.is_initialized():
        target = resolve_address(address, log)
        if target is None:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(-(-min_cpus // 1))),
                     log_to_driver=True, runtime_env=job_runtime_env())
        else:
            ray.init(address=target, log_to_driver=True, runtime_env=job_runtime_env())
        total = ray.cluster_resources()
        where = f"joined the cluster at {target}" if target else "started a local instance"
        log(f"Ray: {where}: {len(_alive_nodes())} node(s), {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU")
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


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
