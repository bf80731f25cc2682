"""make bench-train: recsvc-train fit end to end against implicit's own ALS fit on 10M generated interactions."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

FACTORS, ITERATIONS = 64, 15
TARGET_RATIO = 1.25
TARGET_RSS_GIB = 4.0
WARM_GIB = 6.0  # more than recsvc-train's peak and implicit's together
EVENT_TYPES = ["view", "click", "add_to_cart", "purchase", "support_ticket"]
EVENT_SHARES = [0.55, 0.22, 0.1, 0.08, 0.05]
END = 1_793_491_200  # 2026-11-01T00:00:00Z
DAYS = 90


def _long_tailed(rng: np.random.Generator, n_ids: int, n_draws: int, exponent: float) -> np.ndarray:
    """n_draws positions in [0, n_ids) with Zipf-like popularity (rank r has weight 1 / (r + 1) ** exponent),
    ranks shuffled so popular ids are spread over the id range."""
    weights = 1.0 / np.arange(1, n_ids + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(n_draws) * cdf[-1])
    return rng.permutation(n_ids)[np.minimum(ranks, n_ids - 1)].astype(np.int32)


def _ids(prefix: str, n: int, width: int) -> pa.Array:
    return pa.array([f"{prefix}{i:0{width}d}" for i in range(n)], type=pa.string())


def generate(path: Path, customers: int, items: int, interactions: int, seed: int) -> None:
    """Write an interactions Parquet file: long-tailed customer activity and item popularity,
    event types and Unix-second timestamps over the last 90 days."""
    rng = np.random.default_rng(seed)
    customer = _long_tailed(rng, customers, interactions, 0.6)
    item = _long_tailed(rng, items, interactions, 0.9)
    event = rng.choice(len(EVENT_TYPES), size=interactions, p=EVENT_SHARES).astype(np.int32)
    timestamp = END - (rng.random(interactions) * DAYS * 86400).astype(np.int64)
    table = pa.table({
        "customer_id": _ids("C", customers, 7).take(pa.array(customer)),
        "item_id": _ids("SKU-", items, 6).take(pa.array(item)),
        "event_type": pa.array(EVENT_TYPES, type=pa.string()).take(pa.array(event)),
        "timestamp": pa.array(timestamp),
    })
    pq.write_table(table, path)


def warm_memory(gib: float) -> float:
    """Touch `gib` GiB once in a child process and free it: seconds taken.

    On a fresh virtual machine the first touch of a memory page costs tens of microseconds (the
    hypervisor backs it then); afterwards a page costs well under one. Whichever side ran first
    would pay that for all its arrays, so both start from memory touched once here.
    """
    started = time.perf_counter()
    code = f"import numpy as np; a = np.ones({int(gib * 2**30) // 8}, dtype=np.float64)"
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def _available_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def implicit_fit_seconds(path: Path) -> tuple[float, float, int]:
    """implicit's own ALS fit on the same matrix recsvc-train builds: (wall seconds, CPU seconds, stored pairs)."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from training.ingest import IngestOptions, load_interactions

    matrix = load_interactions(path, IngestOptions()).matrix()
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=FACTORS, iterations=ITERATIONS, regularization=1.0,
                                        random_state=42, calculate_training_loss=False)
        started, cpu_started = time.perf_counter(), time.process_time()
        model.fit(matrix, show_progress=False)
        return time.perf_counter() - started, time.process_time() - cpu_started, int(matrix.nnz)


def recsvc_fit(path: Path, workdir: Path) -> tuple[float, float, float, dict]:
    """Run `recsvc-train fit --strategies als` as a child process:
    (wall seconds, CPU seconds, peak RSS GiB, its JSON summary)."""
    config = workdir / "train.toml"
    config.write_text(f"[strategies.als]\nfactors = {FACTORS}\niterations = {ITERATIONS}\n\n"
                      "[evaluation.holdout]\nmax_customers = 2000\n", encoding="utf-8")
    command = [str(Path(sys.executable).parent / "recsvc-train"), "fit", "--interactions", str(path),
               "--registry", str(workdir / "registry"), "--strategies", "als", "--config", str(config),
               "--quiet", "--log-format", "json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"recsvc-train fit failed ({result.returncode}):\n{result.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # ru_maxrss: KiB on Linux, the largest child so far
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, cpu, after.ru_maxrss / 2**20, json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=500_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recsvc-bench-train-") as tmp:
        workdir = Path(tmp)
        path = workdir / "interactions.parquet"
        started = time.perf_counter()
        generate(path, args.customers, args.items, args.interactions, args.seed)
        generated = time.perf_counter() - started
        warm_gib = min(WARM_GIB, _available_gib() / 2)
        warmed = warm_memory(warm_gib)
        # recsvc first: the child's peak RSS must not include anything this process allocated.
        recsvc_seconds, recsvc_cpu, peak_gib, summary = recsvc_fit(path, workdir)
        implicit_seconds, implicit_cpu, pairs = implicit_fit_seconds(path)
    ratio = recsvc_seconds / implicit_seconds
    figures = {"interactions": args.interactions, "customer_item_pairs": pairs, "generate_seconds": round(generated, 1),
               "implicit_fit_seconds": round(implicit_seconds, 1), "recsvc_fit_seconds": round(recsvc_seconds, 1),
               "memory_warm_up": {"gib": round(warm_gib, 1), "seconds": round(warmed, 1)}, "ratio": round(ratio, 3),
               "implicit_cpu_seconds": round(implicit_cpu, 1),
               "recsvc_cpu_seconds": round(recsvc_cpu, 1), "cpu_ratio": round(recsvc_cpu / implicit_cpu, 3),
               "peak_rss_gib": round(peak_gib, 2), "recsvc_steps": summary["seconds"],
               **{f"{name}_ndcg@10": summary["metrics"][name]["ndcg@10"] for name in ("als", "popular")}}
    if args.json:
        print(json.dumps(figures))
    else:
        steps = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in summary["seconds"].items())
        print(f"recsvc-train fit steps: {steps}")
        print(f"holdout nDCG@10: als {figures['als_ndcg@10']:.4f}, popular {figures['popular_ndcg@10']:.4f}")
        print(f"generated {args.interactions:,} interactions ({pairs:,} customer-item pairs) in {generated:.1f}s; "
              f"touched {warm_gib:.1f} GiB of memory once beforehand in {warmed:.1f}s (first touches are slow on a "
              "fresh VM)")
        print(f"implicit ALS fit ({FACTORS} factors, {ITERATIONS} iterations): {implicit_seconds:.1f}s")
        print(f"recsvc-train fit --strategies als, end to end:       {recsvc_seconds:.1f}s")
        print(f"CPU seconds (user + system): implicit {implicit_cpu:.1f}, recsvc-train {recsvc_cpu:.1f}, "
              f"ratio {recsvc_cpu / implicit_cpu:.3f} (less sensitive to other load on a shared machine)")
        print(f"ratio {ratio:.3f} (target <= {TARGET_RATIO}); peak RSS {peak_gib:.2f} GiB (target <= {TARGET_RSS_GIB})")
    if ratio > TARGET_RATIO or peak_gib > TARGET_RSS_GIB:
        sys.exit(1)


if __name__ == "__main__":
    main()
