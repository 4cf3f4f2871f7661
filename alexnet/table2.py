"""Ensemble results next to the paper's Table 2: one set of table cells, rendered as Markdown and HTML,
and a bar chart."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from alexnet.members import Member

# Table 2 of the paper, ILSVRC-2012 validation error in % (10 patches averaged); * = pre-trained with a
# sixth conv layer on ImageNet Fall 2011, then fine-tuned.
PAPER_TABLE2 = {1: ("1 CNN", 40.7, 18.2), 5: ("5 CNNs", 38.1, 16.4), 7: ("7 CNNs*", 36.7, 15.4)}
PAPER_STARRED_SINGLE = ("1 CNN*", 39.0, 16.6)
HEAD = ("ensemble", "crops", "top-1 val err (%)", "top-5 val err (%)", "members", "paper (Table 2)",
        "paper top-1", "paper top-5")
NOTE = ("Paper: ILSVRC-2012 validation, 1000 classes, 10 patches averaged; * = pre-trained on ImageNet "
        "Fall 2011 with a sixth conv layer, then fine-tuned. Ours: the validation split of the data named "
        "in the run's tags; the same rule (members' softmax outputs averaged).")


def table_cells(rows: list[dict], members: list[Member]) -> list[tuple[str, ...]]:
    """One tuple of cells (as in HEAD) per ensemble row."""
    names = {m.run_id: m.name for m in members}
    starred = any(m.pretrained for m in members)
    body = []
    for r in rows:
        label = f"{r['size']} CNN{'s' if r['size'] > 1 else ''}{'*' if starred else ''}"
        if r["size"] == 1:
            top1 = f"{100 * r['top1']:.2f} ± {100 * r['top1_std']:.2f} (best {100 * r['top1_best']:.2f})"
            top5 = f"{100 * r['top5']:.2f} ± {100 * r['top5_std']:.2f} (best {100 * r['top5_best']:.2f})"
            who = f"each of {len(r['members'])}, mean ± std"
        else:
            top1, top5 = f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}"
            who = ", ".join(names[i] for i in r["members"])
        paper = PAPER_STARRED_SINGLE if (starred and r["size"] == 1) else PAPER_TABLE2.get(r["size"])
        ref = (paper[0], f"{paper[1]:.1f}", f"{paper[2]:.1f}") if paper else ("—", "—", "—")
        body.append((label, r["crops"], top1, top5, who, *ref))
    return body


def markdown_table(rows: list[dict], members: list[Member]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(rows, members)]
    return "\n".join([*lines, "", NOTE])


def html_table(rows: list[dict], members: list[Member]) -> str:
    def row(tag: str, cells) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    body = "".join(row("td", cells) for cells in table_cells(rows, members))
    return f"<table border='1' cellpadding='4'>{row('th', HEAD)}{body}</table><p>{html.escape(NOTE)}</p>"


def bar_chart_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.3, [100 * r["top1"] for r in rows], 0.2, label="top-1 (ours)",
           yerr=[100 * r.get("top1_std", 0) for r in rows])
    ax.bar(x - 0.1, [100 * r["top5"] for r in rows], 0.2, label="top-5 (ours)",
           yerr=[100 * r.get("top5_std", 0) for r in rows])
    paper = [PAPER_TABLE2.get(r["size"]) for r in rows]
    ax.bar(x + 0.1, [p[1] if p else 0 for p in paper], 0.2, label="top-1 (paper)", hatch="//", alpha=0.5)
    ax.bar(x + 0.3, [p[2] if p else 0 for p in paper], 0.2, label="top-5 (paper)", hatch="//", alpha=0.5)
    ax.set_xticks(x, [f"{r['size']} CNN{'s' * (r['size'] > 1)}\n{r['crops']}" for r in rows])
    ax.set_ylabel("validation error (%)")
    ax.set_title("Ensembles vs the paper's Table 2")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
