"""Ensembles: members' softmax outputs averaged (the paper's rule), and the errors that follow.

Size 1 reports the mean, std and best over the members; a size below the member count uses a
seeded subset, the same for every crop mode.
"""

from __future__ import annotations

import numpy as np

TOP_K = 5


def topk_errors(probs: np.ndarray, labels: np.ndarray, k: int = TOP_K) -> tuple[float, float]:
    """(top-1 error, top-k error) of class scores (N, C) against labels (N,)."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    hits = top == labels[:, None]
    return float(1 - hits[:, 0].mean()), float(1 - hits.any(1).mean())


def choose_members(run_ids: list[str], size: int, seed: int) -> list[str]:
    """All members, or a seeded subset of `size` of them (the same for every crop mode)."""
    if size >= len(run_ids):
        return list(run_ids)
    pick = np.random.default_rng([seed, size]).choice(len(run_ids), size, replace=False)
    return [run_ids[i] for i in sorted(pick)]


def ensemble_rows(probs: dict[str, dict[str, np.ndarray]], labels: np.ndarray, sizes: tuple[int, ...],
                  modes: tuple[str, ...], seed: int) -> list[dict]:
    """One row per (size, mode): the averaged-softmax errors (size 1: mean, std and best over members)."""
    run_ids = list(probs)
    rows = []
    for size in sizes:
        for mode in modes:
            chosen = choose_members(run_ids, size, seed)
            row = {"size": size, "crops": mode, "members": chosen,
                   "selection": "all" if size == len(run_ids) else (
                       "each member alone" if size == 1 else f"seeded subset (seed {seed})")}
            if size == 1:
                each = np.array([topk_errors(probs[r][mode], labels) for r in run_ids])
                best = int(np.argmin(each[:, 0]))
                row |= {"members": run_ids, "top1": float(each[:, 0].mean()), "top5": float(each[:, 1].mean()),
                        "top1_std": float(each[:, 0].std()), "top5_std": float(each[:, 1].std()),
                        "top1_best": float(each[best, 0]), "top5_best": float(each[best, 1]),
                        "best_member": run_ids[best]}
            else:
                mean = np.mean([probs[r][mode] for r in chosen], axis=0)
                row["top1"], row["top5"] = topk_errors(mean, labels)
            rows.append(row)
    return rows
