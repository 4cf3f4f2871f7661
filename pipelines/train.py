"""AlexNet on Ray Train: data-parallel workers, the paper's two towers over each worker's GPUs, MLflow.

    python pipelines/train.py --data OUT [--num-workers N] [--gpus-per-worker {0,1,2}] [--epochs 90]
    python pipelines/train.py --data OUT --seeds 5 --run-name five     # an ensemble's members
    python pipelines/train.py --data OUT --init-from RUN_ID_OR_CHECKPOINT   # fine-tuning
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

from alexnet.config import TrainConfig
from alexnet.exits import run_job


def main(argv: Sequence[str] | None = None) -> int:
    cfg = TrainConfig.parse_args(argv, description=__doc__.splitlines()[0])
    from ray.train import TrainingFailedError

    from alexnet.outbox import UNSENT_EXIT, Unsent
    from alexnet.train import run_members

    unsent = None
    try:
        summaries, code = run_job(run_members, cfg)
    except Unsent as err:  # trained, but MLflow lacks part of it: say what and how to send it
        summaries, unsent, code = err.summaries, err, None
    except TrainingFailedError as err:
        print(f"error: training failed: {err}", file=sys.stderr)
        return 1
    if code is not None:
        return code
    for summary in summaries:
        if summary.get("input_only"):
            print(f"{summary['run_name']}: input only: best epoch {summary.get('best_epoch')} delivered "
                  f"{summary.get('images_per_s', math.nan):,.0f} img/s (first batch after "
                  f"{summary.get('first_batch_s', math.nan):.2f} s)")
            print(f"MLflow run id: {summary['mlflow_run_id']}")
            continue
        print(f"{summary['run_name']}: best val/top1_err {summary['val/top1_err_best']:.4f} at epoch "
              f"{summary['best_epoch']}; model {summary['model_uri']}")
        if summary.get("registered_model"):
            print(f"registered as models:/{summary['registered_model']}")
        print(f"MLflow run id: {summary['mlflow_run_id']}")
    if len(summaries) > 1:
        print(f"ensemble of {len(summaries)}: python pipelines/evaluate.py --data {cfg.data} --runs "
              + " ".join(s["mlflow_run_id"] for s in summaries))
    if unsent is not None:
        print(f"error: {unsent}", file=sys.stderr)
        return UNSENT_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
