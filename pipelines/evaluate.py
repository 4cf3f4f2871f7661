"""1/5/7-CNN ensembles on the validation set, next to the paper's Table 2, in MLflow.

    python pipelines/evaluate.py --data OUT --runs ID ID ... [--sizes 1 5 7] [--crops both]
    python pipelines/evaluate.py --data OUT --experiment alexnet-ray --filter "tags.ensemble_group = 'five'"
"""

from __future__ import annotations

import sys
from typing import Sequence

from alexnet.config import EvalConfig
from alexnet.exits import run_job


def main(argv: Sequence[str] | None = None) -> int:
    cfg = EvalConfig.parse_args(argv, description=__doc__.splitlines()[0])
    from alexnet.evaluate import run_evaluation

    summary, code = run_job(run_evaluation, cfg)
    if code is not None:
        return code
    print(summary["table"])
    print(f"MLflow run id: {summary['mlflow_run_id']} (experiment {cfg.ensemble_experiment!r}; one nested run "
          "per ensemble size and crop mode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
