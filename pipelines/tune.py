"""Ray Tune sweeps of learning rate, weight decay and dropout around the paper's values.

    python pipelines/tune.py --data OUT --num-samples 8 --epochs 10 [every pipelines/train.py flag]
    python pipelines/tune.py --data OUT --sweep-name NAME --resume

Exit code: 0 when every trial finished, 2 for bad input, 64 + N when N trials failed, 130 when interrupted.
"""

from __future__ import annotations

import sys
from typing import Sequence

from alexnet.config import SweepConfig
from alexnet.exits import run_job

FAILED_BASE = 64


def main(argv: Sequence[str] | None = None) -> int:
    cfg = SweepConfig.parse_args(argv, description=__doc__.splitlines()[0])
    from tuning.sweep import run_sweep

    summary, code = run_job(run_sweep, cfg)
    if code is not None:
        return code
    print(summary["table"])
    if summary["best_command"]:
        print(f"best: {summary['best']['trial']} (val/top1_err {summary['best']['best_val_top1_err']:.4f}); retrain with:")
        print(f"  {summary['best_command']}")
    print(f"MLflow parent run id: {summary['parent_run_id']}")
    if summary["failed"]:
        print(f"error: {summary['failed']} trial(s) failed", file=sys.stderr)
        return FAILED_BASE + min(summary["failed"], 63)
    return 0


if __name__ == "__main__":
    sys.exit(main())
