"""Ensemble results next to the paper's Table 2: one set of table cells, rendered as Markdown and HTML,
and a bar chart."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from alexnet.members import Member

# Table 2 of the paper, ILSVRC-2012 validation error in % (10 patches averaged); * = pre-trained with a
# sixth conv layer on ImageNet Fall 2011, then fine-tuned. Keyed by the row labels of `plan_rows`.
PAPER_TABLE2 = {"1 CNN": (40.7, 18.2), "5 CNNs": (38.1, 16.4), "1 CNN*": (39.0, 16.6), "7 CNNs*": (36.7, 15.4)}
HEAD = ("ensemble", "crops", "top-1 val err (%)", "top-5 val err (%)", "members", "paper (Table 2)",
        "paper top-1", "paper top-5")
NOTE = ("Paper: ILSVRC-2012 validation, 1000 classes, 10 patches averaged (so only the 10crop rows carry its "
        "numbers); * = pre-trained on ImageNet Fall 2011 with a sixth conv layer, then fine-tuned (ours: "
        "--init-from). A row carries a paper label only when its members follow the paper's recipe; other "
        "sizes are ours alone. Ours: the validation split of the data named in the run's tags; the same rule "
        "(members' softmax outputs averaged).")


def paper_errors(row: dict) -> tuple[float, float] | None:
    """The paper's (top-1, top-5) % for this row: its recipe, and 10 patches."""
    return PAPER_TABLE2.get(row.get("paper")) if row["crops"] == "10crop" else None


def table_cells(rows: list[dict], members: list[Member]) -> list[tuple[str, ...]]:
    """One tuple of cells (as in HEAD) per ensemble row."""
    names = {m.run_id: m.name for m in members}
    body = []
    for r in rows:
        if r["size"] == 1:
            top1 = f"{100 * r['top1']:.2f} ± {100 * r['top1_std']:.2f} (best {100 * r['top1_best']:.2f})"
            top5 = f"{100 * r['top5']:.2f} ± {100 * r['top5_std']:.2f} (best {100 * r['top5_best']:.2f})"
            who = f"each of {len(r['members'])}, mean ± std: " + ", ".join(names[i] for i in r["members"])
        else:
            top1, top5 = f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}"
            who = ", ".join(names[i] for i in r["members"])
        paper = paper_errors(r)
        ref = (r["paper"], f"{paper[0]:.1f}", f"{paper[1]:.1f}") if paper else ("—", "—", "—")
        body.append((r["label"], r["crops"], top1, top5, who, *ref))
    return body


def markdown_table(rows: list[dict], members: list[Member]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(rows, members)]
    return "\n".join([*lines, "", NOTE])


def html_table(rows: list[dict], members: list[Member]) -> str:
    """A whole page (UTF-8 declared: the ± and — signs)."""
    def row(tag: str, cells) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    body = "".join(row("td", cells) for cells in table_cells(rows, members))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Ensembles vs Table 2</title></head><body>"
            f"<table border='1' cellpadding='4'>{row('th', HEAD)}{body}</table><p>{html.escape(NOTE)}</p>"
            "</body></html>")


def bar_chart_png(rows: list[dict], path: Path) -> None:
    """Our errors and the paper's, side by side, every bar labelled with its value; "n/a" where the paper
    has no such row (a missing value is never drawn as 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4.5))
    x = np.arange(len(rows))
    paper = [paper_errors(r) for r in rows]
    series = [("top-1 (ours)", [100 * r["top1"] for r in rows], {"yerr": [100 * r.get("top1_std", 0) for r in rows]}),
              ("top-5 (ours)", [100 * r["top5"] for r in rows], {"yerr": [100 * r.get("top5_std", 0) for r in rows]}),
              ("top-1 (paper)", [p[0] if p else np.nan for p in paper], {"hatch": "//", "alpha": 0.5}),
              ("top-5 (paper)", [p[1] if p else np.nan for p in paper], {"hatch": "//", "alpha": 0.5})]
    for i, (label, values, style) in enumerate(series):
        bars = ax.bar(x - 0.3 + 0.2 * i, np.nan_to_num(values, nan=0.0), 0.2, label=label, **style)
        ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.1f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(x, [f"{r['label']}\n{r['crops']}" for r in rows], fontsize=8)
    ax.set_ylabel("validation error (%)")
    ax.set_title("Ensembles vs the paper's Table 2 (paper: 10 patches only)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
