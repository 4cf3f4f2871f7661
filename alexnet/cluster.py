"""Joining or starting Ray, and refusing requests the cluster can never satisfy (instead of pending forever)."""

from __future__ import annotations

import os
import sys

from alexnet.config import UsageError

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


def connect_ray(address: str | None, min_cpus: float = 0) -> None:
    """Join `address` ('auto' or host:port), or start a local Ray with at least `min_cpus` logical CPUs.

    A local start may advertise more CPUs than the machine has: two training workers plus Ray
    Data's decoding tasks then share the cores instead of waiting for each other.
    """
    import ray

    if not ray.is_initialized():
        kwargs = {}
        if address is None:
            kwargs["num_cpus"] = max(os.cpu_count() or 1, int(-(-min_cpus // 1)))
        ray.init(address=address, log_to_driver=True, runtime_env=job_runtime_env(), **kwargs)
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
    for key, amount in need.items():
        largest = max((r.get(key, 0.0) for r in nodes), default=0.0)
        if largest < amount:
            raise UsageError(f"one worker needs {amount:g} {key} on a single node, but the largest node of this "
                             f"cluster has {largest:g} {key} (nodes: {len(nodes)})")
    capacity = worker_capacity(per_worker)
    if capacity < num_workers:
        raise UsageError(f"this cluster holds at most {capacity} worker(s) of {_fmt(need)}, "
                         f"but --num-workers is {num_workers}")
    left = sum(r.get("CPU", 0.0) for r in nodes) - num_workers * per_worker.get("CPU", 0.0)
    if left < spare_cpus:
        raise UsageError(f"the workers take all CPUs of the cluster, leaving {left:g}: at least {spare_cpus:g} "
                         "must remain for Ray Data's decoding tasks (lower --cpus-per-worker or add a node)")
