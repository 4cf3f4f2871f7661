"""Ray Tune sweeps of learning rate, weight decay and dropout around the paper's values.

    python pipelines/tune.py --data OUT --num-samples 8 --epochs 10 [every pipelines/train.py flag]
    python pipelines/tune.py --data OUT --sweep-name NAME --resume

Exit code: 0 when every trial finished, 2 for bad input, 3 when MLflow writes are kept for a tracking store
that was away (the command to send them is printed), 64 + N when N trials failed, 130 when interrupted.
"""

from __future__ import annotations

import sys
from typing import Sequence

from alexnet.config import SweepConfig
from alexnet.exits import run_job

FAILED_BASE = 64


def main(argv: Sequence[str] | None = None) -> int:
    cfg = SweepConfig.parse_args(argv, description=__doc__.splitlines()[0])
    from alexnet.outbox import UNSENT_EXIT, send_command
    from tuning.sweep import run_sweep

    summary, code = run_job(run_sweep, cfg)
    if code is not None:
        return code
    print(summary["table"])
    if summary["best_command"]:
        print(f"best: {summary['best']['trial']} (val/top1_err {summary['best']['val/top1_err_best']:.4f}); retrain with:")
        print(f"  {summary['best_command']}")
    print(f"MLflow parent run id: {summary['parent_run_id']}")
    if summary["unsent"]:  # the tracking store was away at the end: what MLflow still lacks, and how to send it
        print(f"error: MLflow tracking store {summary['tracking_uri']} failed: the sweep finished, "
              f"{len(summary['unsent'])} run(s)' MLflow writes are kept; send them when it answers: "
              + send_command(" ".join(summary["unsent"])), file=sys.stderr)
    if summary["failed"]:
        print(f"error: {summary['failed']} trial(s) failed", file=sys.stderr)
        return FAILED_BASE + min(summary["failed"], 63)
    return UNSENT_EXIT if summary["unsent"] else 0


if __name__ == "__main__":
    sys.exit(main())
