"""The compiled scorer against scikit-learn, one row at a time (what a request needs).

    .venv/bin/python bench/scorer_bench.py [--rows 2000] [--repeats 5]

Trains the global forest as ``posguard-server train`` does (100 trees, ``max_samples`` 256) on the features of
the sample history, then times ``IsolationForest.score_samples`` on one row against
``CompiledForest.score_one`` on the same rows, both in the same run; reports the median per-row time of each
over ``--repeats`` passes and their ratio, and checks that both give the same scores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest

from posguard_models.features import batch_features
from posguard_models.forest import CompiledForest
from posguard_models.training import TrainingConfig
from posguard_server.pipeline.importer import read_transactions

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "handbook_sample.csv.gz"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rows = sorted(read_transactions(SAMPLE), key=lambda r: (r.customer_ref, r.transaction.event_time))
    customers = np.array([r.customer_ref for r in rows], dtype=object)
    times = np.array([r.transaction.event_time.timestamp() for r in rows])
    amounts = np.array([r.transaction.amount_minor / 100 for r in rows])
    X = batch_features(customers, times, amounts)  # noqa: N806 - a matrix
    config = TrainingConfig()
    model = IsolationForest(
        n_estimators=config.n_estimators, max_samples=config.max_samples, random_state=config.seed
    ).fit(X)
    compiled = CompiledForest.from_sklearn(model)
    sample = X[np.random.default_rng(0).choice(len(X), size=min(args.rows, len(X)), replace=False)]

    def per_row(score: object) -> float:
        began = time.perf_counter()
        for x in sample:
            score(x)  # type: ignore[operator]
        return (time.perf_counter() - began) / len(sample)

    sk_times, ours_times = [], []
    for _ in range(args.repeats):
        sk_times.append(per_row(lambda x: model.score_samples(x.reshape(1, -1))[0]))
        ours_times.append(per_row(compiled.score_one))
    worst = max(abs(model.score_samples(x.reshape(1, -1))[0] - compiled.score_one(x)) for x in sample[:200])
    sk, ours = statistics.median(sk_times), statistics.median(ours_times)
    print("| scorer, one row | median µs/row | ratio |")
    print("|---|---|---|")
    print(f"| scikit-learn `score_samples` | {sk * 1e6:,.1f} | 1 |")
    print(f"| posguard `CompiledForest.score_one` | {ours * 1e6:,.1f} | {sk / ours:,.0f}× faster |")
    print(f"\nlargest score difference on 200 rows: {worst:.1e}")


if __name__ == "__main__":
    main()
