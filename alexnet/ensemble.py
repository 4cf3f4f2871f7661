"""Ensembles: members' softmax outputs averaged (the paper's rule), and the errors that follow.

Rows follow the paper's Table 2 where the members allow it (`plan_rows`); size 1 reports the mean,
std and best over the members; a size below the member count uses a seeded subset, the same for
every crop mode.
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


def plan_rows(members: list[tuple[str, bool]], sizes: tuple[int, ...], seed: int) -> list[dict]:
    """Which members each row averages, from (run id, pre-trained) pairs: the paper's Table 2 rows that the
    members allow, each under its label only when it is the paper's recipe (`paper` names it), and the other
    sizes asked for under their own labels.

    Size 1: "1 CNN" (each plain member alone) and "1 CNN*" (each pre-trained one); size 5: "5 CNNs" from
    plain members only; size 7: "7 CNNs*" = 5 plain + 2 pre-trained (the paper's recipe).
    """
    plain = [r for r, pre in members if not pre]
    pretrained = [r for r, pre in members if pre]
    everyone = [r for r, _ in members]
    plans = []
    for size in sizes:
        if size == 1:
            plans += [{"label": label, "paper": label, "size": 1, "members": group, "selection": what}
                      for label, group, what in (("1 CNN", plain, "each plain member alone"),
                                                 ("1 CNN*", pretrained, "each pre-trained member alone"))
                      if group]
        elif size == 5 and len(plain) >= 5:
            plans.append({"label": "5 CNNs", "paper": "5 CNNs", "size": 5, "members": choose_members(plain, 5, seed),
                          "selection": "plain members" + (f", seeded subset (seed {seed})" if len(plain) > 5 else "")})
        elif size == 7 and len(plain) >= 5 and len(pretrained) >= 2:
            chosen = choose_members(plain, 5, seed) + choose_members(pretrained, 2, seed)
            plans.append({"label": "7 CNNs*", "paper": "7 CNNs*", "size": 7, "members": chosen,
                          "selection": "5 plain + 2 pre-trained members (the paper's recipe)"})
        else:
            chosen = choose_members(everyone, size, seed)
            starred = sum(r in pretrained for r in chosen)
            label = f"{size} CNNs" + (f" ({size - starred} plain + {starred} pre-trained)" if starred else "")
            plans.append({"label": label, "paper": None, "size": size, "members": chosen,
                          "selection": "all" if size == len(everyone) else f"seeded subset (seed {seed})"})
    return plans


def ensemble_rows(probs: dict[str, dict[str, np.ndarray]], labels: np.ndarray, plans: list[dict],
                  modes: tuple[str, ...]) -> list[dict]:
    """One row per (plan, mode): the averaged-softmax errors (size 1: mean, std and best over its members),
    and the gain over the mean of its members alone."""
    rows = []
    for plan in plans:
        for mode in modes:
            row = dict(plan, crops=mode)
            each = np.array([topk_errors(probs[r][mode], labels) for r in plan["members"]])
            if plan["size"] == 1:
                best = int(np.argmin(each[:, 0]))
                row |= {"top1": float(each[:, 0].mean()), "top5": float(each[:, 1].mean()),
                        "top1_std": float(each[:, 0].std()), "top5_std": float(each[:, 1].std()),
                        "top1_best": float(each[best, 0]), "top5_best": float(each[best, 1]),
                        "best_member": plan["members"][best]}
            else:
                mean = np.mean([probs[r][mode] for r in plan["members"]], axis=0)
                row["top1"], row["top5"] = topk_errors(mean, labels)
                row["top1_gain"] = float(each[:, 0].mean()) - row["top1"]
                row["top5_gain"] = float(each[:, 1].mean()) - row["top5"]
            rows.append(row)
    return rows
