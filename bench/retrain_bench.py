"""Retraining throughput: per-customer models per second, in one process, on joblib, on a local Dask cluster.

    .venv/bin/python bench/retrain_bench.py [--data FILE] [--customers 400] [--workers 2] [--repeats 3]

Builds the training jobs ``posguard-server retrain`` builds (each customer's usable feature rows, the default
training configuration) for the first ``--customers`` customers with enough history in ``--data`` (default:
the handbook development file when it is beside the repository, else the test sample), then times the fitting
stage (fit, compile, serialise, return the artifact) in the same run: as a baseline, scikit-learn's
``IsolationForest`` ensemble in one process; then posguard's fit in one process, on a joblib process pool of
``--workers``, and on a local Dask cluster of ``--workers`` single-process workers started as separate
processes (after one warm-up pass, so workers have imported the libraries). Reports the median of
``--repeats`` passes of each as models per second, the ratio to posguard's fit in one process, and the
artifact size per customer model; and checks that every way, the baseline included, produced the same
forests.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest

from posguard_models.features import batch_features
from posguard_models.forest import CompiledForest
from posguard_models.retraining import CustomerFit, CustomerJob
from posguard_models.training import TrainingConfig, customer_spans
from posguard_server.pipeline.dask_local import local_dask_cluster
from posguard_server.pipeline.importer import read_transactions
from posguard_server.pipeline.retrain import RetrainOptions, fit_jobs

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "handbook_dev.csv.gz"
SAMPLE = ROOT / "tests" / "data" / "handbook_sample.csv.gz"


def build_jobs(path: Path, customers: int, config: TrainingConfig) -> list[CustomerJob]:
    rows = sorted(read_transactions(path), key=lambda r: (r.customer_ref, r.transaction.event_time))
    refs = np.array([r.customer_ref for r in rows], dtype=object)
    times = np.array([r.transaction.event_time.timestamp() for r in rows])
    amounts = np.array([r.transaction.amount_minor / 100 for r in rows])
    X = batch_features(refs, times, amounts)  # noqa: N806 - a matrix
    jobs: list[CustomerJob] = []
    for start, end in customer_spans(refs):
        if end - start >= config.customer_min_history:
            jobs.append(CustomerJob(str(refs[start]), X[start:end], times[start:end]))
        if len(jobs) == customers:
            break
    return jobs


def timed(run: Callable[[], list[CustomerFit]], repeats: int) -> tuple[float, list[CustomerFit]]:
    seconds: list[float] = []
    fits: list[CustomerFit] = []
    for _ in range(repeats):
        began = time.perf_counter()
        fits = run()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), fits


def same_forests(a: list[CustomerFit], b: list[CustomerFit], probe: np.ndarray) -> bool:
    return [f.customer for f in a] == [f.customer for f in b] and all(
        np.array_equal(
            CompiledForest.from_bytes(x.artifact).score_samples(probe),
            CompiledForest.from_bytes(y.artifact).score_samples(probe),
        )
        for x, y in zip(a, b, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEV if DEV.exists() else SAMPLE)
    parser.add_argument("--customers", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = TrainingConfig()
    jobs = build_jobs(args.data, args.customers, config)
    probe = np.vstack([job.X[:5] for job in jobs[:50]])
    print(f"{len(jobs)} customers of {args.data.name}, {sum(len(j.X) for j in jobs):,} training rows")

    def ensemble_fits() -> list[CustomerFit]:
        """The baseline: scikit-learn's IsolationForest object, compiled and serialised the same way."""
        out = []
        for job in jobs:
            model = IsolationForest(
                n_estimators=config.customer_estimators,
                max_samples=min(config.max_samples, len(job.X)),
                random_state=config.seed,
            ).fit(job.X)
            artifact = CompiledForest.from_sklearn(model).to_bytes()
            out.append(CustomerFit(job.customer, artifact, len(job.X), job.times[0], job.times[-1]))
        return out

    serial = RetrainOptions(config=config)
    pooled = RetrainOptions(config=config, jobs=args.workers)
    results: list[tuple[str, float, list[CustomerFit]]] = []
    results.append(("one process, IsolationForest ensemble", *timed(ensemble_fits, args.repeats)))
    results.append(("one process", *timed(lambda: fit_jobs(jobs, serial), args.repeats)))
    fit_jobs(jobs[: 4 * args.workers], pooled)  # start the pool's processes before timing
    pool_name = f"joblib, {args.workers} processes"
    results.append((pool_name, *timed(lambda: fit_jobs(jobs, pooled), args.repeats)))
    with local_dask_cluster(args.workers) as cluster:
        on_dask = RetrainOptions(config=config, dask_scheduler=cluster.address)
        fit_jobs(jobs[: 4 * args.workers], on_dask)  # workers import the libraries once
        results.append(
            (f"Dask, {args.workers} workers", *timed(lambda: fit_jobs(jobs, on_dask), args.repeats))
        )

    base = results[1][1]
    sizes = [len(f.artifact) for f in results[1][2]]
    print()
    print("| how | median seconds | models / s | vs one process |")
    print("|---|---|---|---|")
    for name, seconds, _ in results:
        print(f"| {name} | {seconds:.2f} | {len(jobs) / seconds:.1f} | {base / seconds:.2f}x |")
    print()
    print(
        f"artifact bytes per customer model: median {int(np.median(sizes)):,}, max {max(sizes):,} "
        f"({config.customer_estimators} trees, max_samples {config.max_samples})"
    )
    agree = all(same_forests(results[1][2], fits, probe) for _, _, fits in results)
    print("every way produced the same forests:", "yes" if agree else "NO")


if __name__ == "__main__":
    main()
