"""Calibration of `dora bench-generation`: what a perfect generator would score on a small reference set.

Real shapes stand in for generated ones: ``--per-category`` shapes of each category from the reference set's
*training* part are measured against its held-out part with the same protocol (points, normalisation, Chamfer and
exact EMD, balanced 1-NNA, COV, MMD) and the same judge. With a reference of ~20 held-out shapes the ideal 1-NNA
of 50% is only reached on average; this prints how far real shapes land from it, i.e. the noise floor to read a
pipeline's figures against.

    python tests/benchmarks/bench_generation_ceiling.py --reference outputs/quickstart/prepared [--per-category 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dora_shapegen.pipelines.bench.data import load_reference, select_split  # noqa: E402
from dora_shapegen.pipelines.bench.metrics import CloudSet, distribution_metrics  # noqa: E402
from dora_shapegen.pipelines.bench.run import _distance_matrices, _fit_judge  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference", required=True, help="prepared folder, mesh folder or index with categories"
    )
    parser.add_argument("--per-category", type=int, default=4, help="real 'samples' per category (default 4)")
    parser.add_argument("--points", type=int, default=2048)
    parser.add_argument("--emd-points", type=int, default=256)
    parser.add_argument("--held-out-fraction", type=float, default=0.1)
    parser.add_argument("--judge-k", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    shapes = load_reference(args.reference, args.points, args.held_out_fraction, seed=args.seed)
    held, train = select_split(shapes, "held-out"), select_split(shapes, "train")
    taken: dict[str, int] = {}
    stand_ins = []
    for shape in sorted(train, key=lambda s: s.shape_id):
        if taken.get(shape.category, 0) < args.per_category:
            taken[shape.category] = taken.get(shape.category, 0) + 1
            stand_ins.append(shape)
    matrices = _distance_matrices(
        CloudSet([s.cloud for s in stand_ins]), CloudSet([s.cloud for s in held]), args.emd_points
    )
    result = distribution_metrics(matrices, seed=args.seed)
    judge = _fit_judge(shapes, args.judge_k)
    result |= {
        "judge_accuracy_pct": 100.0 * judge.accuracy,
        "judge_num_held_out": judge.num_held_out,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
