"""ImageNet tree -> Parquet shards, mean image and RGB PCA, on Ray Data.

    python pipelines/preprocess.py --input ROOT --output OUT [--size 256] [--address auto]
"""

from __future__ import annotations

import sys
from typing import Sequence

from alexnet.config import PreprocessConfig
from alexnet.exits import run_job


def main(argv: Sequence[str] | None = None) -> int:
    cfg = PreprocessConfig.parse_args(argv, description=__doc__.splitlines()[0])
    from alexnet.preprocess import format_summary, run_preprocess

    summary, code = run_job(run_preprocess, cfg)
    if code is not None:
        return code
    print(format_summary(summary))
    print(f"wrote {cfg.output}")
    if cfg.strict and sum(summary["rejects"].values()):
        print(f"error: --strict and {sum(summary['rejects'].values())} file(s) rejected "
              f"(see {cfg.output}/rejects.csv)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
