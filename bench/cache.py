"""make bench-cache: hit ratio under Zipf load, warm-up rate, latency with Redis up and killed, against references.

--warm-only times the warm-up alone, --repeat times each, against redis-py's pipelined SET of the same size
measured in between (for A/B runs: --registry keeps the trained model for the next run, and PYTHONPATH set to
another checkout times that checkout's warm-up with this harness)."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # set before numpy loads

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import redis  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from recsvc import artifacts  # noqa: E402
from recsvc.app import create_app  # noqa: E402
from recsvc.cache import KEY_PREFIX  # noqa: E402
from recsvc.config import Settings  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.demo_data import DemoSizes, write  # noqa: E402
from training.pipeline import fit_and_publish  # noqa: E402
from training.warm import most_active, warm_cache  # noqa: E402

from redis_server import RedisServer  # noqa: E402

KEY = "bench-cache-key-0001"
WARM_TARGET = 50_000  # entries per second, the target


@dataclass
class Phase:
    name: str
    latencies: np.ndarray  # seconds, one per request
    hits: float
    misses: float

    def line(self, reference: "Phase | None" = None) -> str:
        p50, p99 = (float(np.percentile(self.latencies, q)) * 1000 for q in (50, 99))
        text = f"{self.name:<36} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms"
        if self.hits + self.misses:
            text += f"  hit ratio {self.hits / (self.hits + self.misses):6.1%}"
        if reference is not None:
            ref99 = float(np.percentile(reference.latencies, 99)) * 1000
            text += f"  p99 x{p99 / ref99:.2f} of {reference.name}"
        return text


def build_registry(workdir: Path, customers: int, items: int, interactions: int) -> Path:
    paths = write(workdir / "demo", DemoSizes(customers=customers, items=items, interactions=interactions), seed=11)
    registry = workdir / "registry"
    config = TrainConfig(strategies=["als"], params={"als": {"factors": 32, "iterations": 10}})
    fit_and_publish(paths["interactions"], registry, config, catalog_path=paths["catalog"], log=lambda _l: None)
    return registry


def zipf_customers(registry: Path, n: int, exponent: float, seed: int) -> list[str]:
    """n requests; the customer of activity rank r is asked for with weight 1 / (r + 1) ** exponent
    (assumption: the most active customers also call most often)."""
    bundle = artifacts.load_current(registry)
    order = most_active(bundle, len(bundle.customers))
    weights = 1.0 / np.arange(1, len(order) + 1, dtype=np.float64) ** exponent
    ranks = np.searchsorted(np.cumsum(weights), np.random.default_rng(seed).random(n) * weights.sum())
    return [bundle.customers.external(int(order[min(r, len(order) - 1)])) for r in ranks]


def lookups() -> tuple[float, float]:
    value = REGISTRY.get_sample_value
    return (value("recsvc_cache_lookups_total", {"result": "hit"}) or 0.0,
            value("recsvc_cache_lookups_total", {"result": "miss"}) or 0.0)


def run_phase(name: str, app, customers: list[str]) -> Phase:
    """Every request through the Flask app (routing, auth, cache, JSON), timed one by one."""
    client = app.test_client()
    headers = {"Authorization": f"Bearer {KEY}"}
    hits0, misses0 = lookups()
    latencies = np.empty(len(customers))
    for i, customer in enumerate(customers):
        started = time.perf_counter()
        response = client.get(f"/v1/customers/{customer}/recommendations", headers=headers)
        latencies[i] = time.perf_counter() - started
        if response.status_code != 200:
            raise SystemExit(f"{name}: HTTP {response.status_code} for {customer}")
    hits, misses = lookups()
    return Phase(name, latencies, hits - hits0, misses - misses0)


def raw_write_rate(url: str, value_bytes: int, n: int) -> float:
    """Reference: entries/s that redis-py can pipeline into this Redis at all (same sizes, same batches)."""
    client = redis.Redis.from_url(url)
    value = b"x" * value_bytes
    started = time.perf_counter()
    for start in range(0, n, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.set(f"bench:raw:{i}", value, px=600_000)
        pipe.execute()
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=50_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--interactions", type=int, default=600_000)
    parser.add_argument("--requests", type=int, default=20_000, help="per load phase")
    parser.add_argument("--top", type=int, default=10_000, help="customers the warm-up precomputes")
    parser.add_argument("--zipf", type=float, default=1.0, help="exponent of the customer load")
    parser.add_argument("--warm-workers", type=int, default=2, help="processes of the second warm-up run")
    parser.add_argument("--warm-only", action="store_true", help="time the warm-up alone, --repeat times")
    parser.add_argument("--repeat", type=int, default=7, help="warm-ups per number of processes (--warm-only)")
    parser.add_argument("--registry", type=Path, help="(--warm-only) the model's registry: trained there when it "
                                                      "has no current version, reused otherwise")
    args = parser.parse_args()
    # One access line per request would dominate the timings; set here, not at import, for importers' sake.
    os.environ.setdefault("RECSVC_LOG_LEVEL", "warning")
    if shutil.which("redis-server") is None:
        raise SystemExit("bench-cache needs redis-server on PATH (make redis-server installs it)")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir)
        try:
            (run_warm_only if args.warm_only else run)(args, workdir, server)
        finally:
            server.kill()


def run(args, workdir: Path, server: RedisServer) -> None:
    started = time.perf_counter()
    registry = build_registry(workdir, args.customers, args.items, args.interactions)
    print(f"model: {args.customers} customers, {args.items} items, {args.interactions} interactions, "
          f"trained in {time.perf_counter() - started:.1f}s; load: {args.requests} requests per phase, "
          f"Zipf exponent {args.zipf}")
    load = zipf_customers(registry, args.requests, args.zipf, seed=1)
    base = Settings(registry=registry, api_keys=frozenset({KEY}), cache_ttl=3600)
    app = create_app(dataclasses.replace(base, redis_url=server.url))
    cold = run_phase("redis, cold cache", app, load)

    client = redis.Redis.from_url(server.url)
    warms = []
    for workers in sorted({1, args.warm_workers}):  # one process, and the given number, each from empty
        client.flushdb()
        warms.append(warm_cache(registry, server.url, top=args.top, log=lambda _line: None, workers=workers))
    keys = [key for _, key in zip(range(1000), client.scan_iter(f"{KEY_PREFIX}:rec:*", count=1000))]
    entry_bytes = int(np.mean([len(value) for value in client.mget(keys)]))
    raw = raw_write_rate(server.url, entry_bytes, warms[-1].entries)

    embedded = create_app(dataclasses.replace(base, local_cache_entries=10 * args.customers,
                                              local_cache_bytes=2**40))  # room for every list
    uncached = create_app(dataclasses.replace(base, local_cache_entries=0))
    run_phase("(embedded cache, filling)", embedded, load)
    # Interleaved slices, so the machine's load at any moment weighs on every configuration alike.
    phases = {"redis": [], "local": [], "none": []}
    for start in range(0, len(load), 1000):
        phases["redis"].append(run_phase(f"redis, warmed top {args.top}", app, load[start:start + 1000]))
        phases["local"].append(run_phase("in-process cache, all hits", embedded, load[start:start + 1000]))
        phases["none"].append(run_phase("no cache (every request computed)", uncached, load[start:start + 250]))
    server.kill()
    down, computed_meanwhile = [], []
    for start in range(0, len(load) // 4, 250):
        down.append(run_phase("redis killed (breaker open)", app, load[start:start + 250]))
        computed_meanwhile.append(run_phase("no cache, same time", uncached, load[start:start + 250]))
    redis_up, in_process, computed = (merge(parts) for parts in phases.values())
    report(warms, raw, entry_bytes, cold, (redis_up, in_process, computed), (merge(down), merge(computed_meanwhile)),
           app.extensions["recsvc"].cache.status())


def run_warm_only(args, workdir: Path, server: RedisServer) -> None:
    """The warm-up alone, from an empty Redis each time, with 1 and --warm-workers processes taking turns;
    redis-py's pipelined SET of the same entries after each pair. Prints min and median of each, and the CPU
    seconds the warm-up's processes and Redis used (less sensitive than wall time to other work on the machine)."""
    registry = args.registry or workdir / "registry"
    if artifacts.load_current(registry) is None:
        started = time.perf_counter()
        build_registry(registry.parent / f"{registry.name}-data", args.customers, args.items, args.interactions)
        (registry.parent / f"{registry.name}-data" / "registry").rename(registry)
        print(f"model trained in {time.perf_counter() - started:.1f}s into {registry}")
    client = redis.Redis.from_url(server.url)
    counts = sorted({1, args.warm_workers})
    runs: dict[int, list] = {workers: [] for workers in counts}
    cpu: dict[int, list] = {workers: [] for workers in counts}
    raws: list[float] = []
    for _ in range(args.repeat):
        for workers in counts:
            client.flushdb()
            before = cpu_seconds(client)
            runs[workers].append(warm_cache(registry, server.url, top=args.top, log=lambda _l: None, workers=workers))
            cpu[workers].append(tuple(b - a for a, b in zip(before, cpu_seconds(client))))
        keys = [key for _, key in zip(range(1000), client.scan_iter(f"{KEY_PREFIX}:rec:*", count=1000))]
        entry_bytes = int(np.mean([len(value) for value in client.mget(keys)]))
        client.flushdb()
        raws.append(raw_write_rate(server.url, entry_bytes, runs[counts[-1]][-1].entries))
    print(f"warm-up alone, {args.repeat} runs each: {runs[1][0].entries} entries ({entry_bytes} bytes each); "
          f"redis-py pipelined SET of the same size min {min(raws):,.0f}/s, median {np.median(raws):,.0f}/s")
    for workers, warms in runs.items():
        rates = [w.entries / w.seconds for w in warms]
        computing = [w.compute_seconds for w in warms]
        own, redis_cpu = zip(*cpu[workers])
        print(f"  {workers} process{'es' if workers > 1 else '  '}: end to end max {max(rates):,.0f}/s, median "
              f"{np.median(rates):,.0f}/s (min {min(w.seconds for w in warms):.3f}s, median "
              f"{np.median([w.seconds for w in warms]):.3f}s); computing min {min(computing):.3f}s, median "
              f"{np.median(computing):.3f}s; CPU of the warm-up min {min(own):.3f}s, median {np.median(own):.3f}s, "
              f"of Redis median {np.median(redis_cpu):.3f}s")


def cpu_seconds(client: redis.Redis) -> tuple[float, float]:
    """(CPU seconds of this process and its ended children, of the Redis server) so far."""
    own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    info = client.info("cpu")
    return own, info["used_cpu_user"] + info["used_cpu_sys"]


def merge(parts: list[Phase]) -> Phase:
    return Phase(parts[0].name, np.concatenate([p.latencies for p in parts]), sum(p.hits for p in parts),
                 sum(p.misses for p in parts))


def report(warms, raw, entry_bytes, cold, up_phases, down_phases, status) -> None:
    print(f"\nwarm-up of {warms[0].entries} entries ({entry_bytes} bytes each), timed from the loaded model to "
          f"the last reply; reference raw redis-py pipelined SET of the same size: {raw:,.0f}/s")
    for warm in warms:
        rate, write_rate = warm.entries / warm.seconds, warm.entries / warm.write_seconds
        processes = f"{warm.workers} process{'es' if warm.workers > 1 else ''}"
        print(f"  {processes:<12} {warm.seconds:.3f}s: {rate:,.0f} entries/s end to end "
              f"({rate / WARM_TARGET:.2f} of the {WARM_TARGET:,} target); computing {warm.compute_seconds:.3f}s, "
              f"writing {warm.write_seconds:.3f}s alongside: {write_rate:,.0f} entries/s written "
              f"(x{write_rate / raw:.2f} redis-py)")
    redis_up, in_process, computed = up_phases
    redis_down, computed_meanwhile = down_phases
    print("\nlatency per request through the Flask app (in-process client, no network to the app):")
    print(cold.line())
    print(redis_up.line(computed))
    print(in_process.line(computed))
    print(computed.line())
    print(redis_down.line(computed_meanwhile))
    print(computed_meanwhile.line())
    print(f"  cache status while Redis was down: {status}")
    up50, local50 = (float(np.percentile(p.latencies, 50)) * 1e6 for p in (redis_up, in_process))
    print(f"\nin-process front cache: a Redis hit costs {up50:.0f} us at p50, an in-process hit {local50:.0f} us: "
          f"it would save at most {up50 - local50:.0f} us ({(up50 - local50) / up50:.0%}) per hit.")


if __name__ == "__main__":
    main()
