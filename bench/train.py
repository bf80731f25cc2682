"""make bench-train: recsvc-train fit end to end against implicit's own ALS fit on 10M generated interactions.

Both sides run as fresh child processes, in alternating rounds (implicit, recsvc, implicit, recsvc):
implicit's child reads the same file into the same matrix first, untimed, then times its fit alone;
recsvc-train is timed end to end (start-up, ingest, split, fit, evaluation, publication). On a VM
whose freed memory goes back to the host within seconds (virtio free page reporting, as here),
touching fresh memory costs about 2 s per GiB, so the figures move with what else runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
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


def implicit_fit(path: Path) -> None:
    """Child process: implicit's own ALS fit on the matrix recsvc-train builds from the file.
    Prints {"seconds", "cpu_seconds", "pairs"} of the fit alone (reading the file is not timed)."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from training.ingest import IngestOptions, load_interactions

    matrix = load_interactions(path, IngestOptions()).matrix()
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=FACTORS, iterations=ITERATIONS, regularization=1.0,
                                        random_state=42, calculate_training_loss=False)
        started, cpu_started = time.perf_counter(), time.process_time()
        model.fit(matrix, show_progress=False)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "pairs": int(matrix.nnz)}))


def measured(command: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS GiB, stdout) of one child process, measured for it alone
    (os.wait4 gives this child's own rusage; RUSAGE_CHILDREN would fold in every child so far)."""
    with tempfile.TemporaryFile(mode="w+") as stderr:  # a file, so a chatty child can never fill a pipe
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        stdout = child.stdout.read()
        _pid, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if code:
            stderr.seek(0)
            sys.exit(f"{' '.join(command[:4])} failed ({code}):\n{stderr.read()}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, stdout  # ru_maxrss: KiB


def recsvc_command(path: Path, workdir: Path) -> list[str]:
    """`recsvc-train fit --strategies als` with the benchmark's ALS size and a 2,000-customer holdout."""
    config = workdir / "train.toml"
    config.write_text(f"[strategies.als]\nfactors = {FACTORS}\niterations = {ITERATIONS}\n\n"
                      "[evaluation.holdout]\nmax_customers = 2000\n", encoding="utf-8")
    return [str(Path(sys.executable).parent / "recsvc-train"), "fit", "--interactions", str(path),
            "--registry", str(workdir / "registry"), "--strategies", "als", "--config", str(config),
            "--quiet", "--log-format", "json"]


def one_round(path: Path, workdir: Path) -> dict:
    """implicit's fit, then recsvc-train fit end to end, each in a fresh process."""
    implicit_wall, _cpu, _rss, out = measured([sys.executable, __file__, "--implicit-fit", str(path)])
    implicit = json.loads(out)
    recsvc_wall, recsvc_cpu, peak_gib, out = measured(recsvc_command(path, workdir))
    summary = json.loads(out.strip().splitlines()[-1])
    return {"implicit_fit_seconds": implicit["seconds"], "implicit_cpu_seconds": implicit["cpu_seconds"],
            "pairs": implicit["pairs"], "recsvc_fit_seconds": recsvc_wall, "recsvc_cpu_seconds": recsvc_cpu,
            "peak_rss_gib": peak_gib, "ratio": recsvc_wall / implicit["seconds"],
            "cpu_ratio": recsvc_cpu / implicit["cpu_seconds"], "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=500_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=3, help="alternating implicit / recsvc pairs; the median "
                        "ratio counts, so load from elsewhere on the machine weighs on both sides alike")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--implicit-fit", type=Path, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.implicit_fit:
        implicit_fit(args.implicit_fit)
        return
    with tempfile.TemporaryDirectory(prefix="recsvc-bench-train-") as tmp:
        workdir = Path(tmp)
        path = workdir / "interactions.parquet"
        started = time.perf_counter()
        generate(path, args.customers, args.items, args.interactions, args.seed)
        generated = time.perf_counter() - started
        rounds = [one_round(path, workdir) for _ in range(args.rounds)]
    report(args, rounds, generated)


def report(args, rounds: list[dict], generated: float) -> None:
    ratio = float(np.median([r["ratio"] for r in rounds]))
    peak_gib = max(r["peak_rss_gib"] for r in rounds)
    last = rounds[-1]["summary"]
    figures = {"interactions": args.interactions, "customer_item_pairs": rounds[0]["pairs"],
               "generate_seconds": round(generated, 1),
               "rounds": [{k: round(v, 3) for k, v in r.items() if k not in ("summary", "pairs")} for r in rounds],
               "ratio": round(ratio, 3), "peak_rss_gib": round(peak_gib, 2), "recsvc_steps": last["seconds"],
               **{f"{name}_ndcg@10": last["metrics"][name]["ndcg@10"] for name in ("als", "popular")}}
    if args.json:
        print(json.dumps(figures))
    else:
        steps = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in last["seconds"].items())
        print(f"recsvc-train fit steps (last round): {steps}")
        print(f"holdout nDCG@10: als {figures['als_ndcg@10']:.4f}, popular {figures['popular_ndcg@10']:.4f}")
        print(f"generated {args.interactions:,} interactions ({rounds[0]['pairs']:,} customer-item pairs) in "
              f"{generated:.1f}s")
        for number, r in enumerate(rounds, start=1):
            print(f"round {number}: implicit ALS fit ({FACTORS} factors, {ITERATIONS} iterations) "
                  f"{r['implicit_fit_seconds']:.1f}s; recsvc-train fit --strategies als end to end "
                  f"{r['recsvc_fit_seconds']:.1f}s; ratio {r['ratio']:.3f}; "
                  f"CPU seconds {r['implicit_cpu_seconds']:.1f} vs {r['recsvc_cpu_seconds']:.1f}, "
                  f"ratio {r['cpu_ratio']:.3f}; recsvc peak RSS {r['peak_rss_gib']:.2f} GiB")
        print(f"ratio (median of {len(rounds)} rounds) {ratio:.3f} (target <= {TARGET_RATIO}); "
              f"peak RSS {peak_gib:.2f} GiB (target <= {TARGET_RSS_GIB})")
    if ratio > TARGET_RATIO or peak_gib > TARGET_RSS_GIB:
        sys.exit(1)


if __name__ == "__main__":
    main()
