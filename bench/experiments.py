"""make bench-experiments: what exposure logging adds to an answer, with Redis up and down, against references."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # set before numpy loads
os.environ.setdefault("RECSVC_LOG_LEVEL", "warning")  # one access line per request would dominate the timings

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from cache import KEY, Phase, build_registry, run_phase, zipf_customers  # noqa: E402

from recsvc.app import create_app  # noqa: E402
from recsvc.config import Settings  # noqa: E402

from redis_server import RedisServer  # noqa: E402

EXPERIMENT = {"name": "bench", "salt": "bench-1", "status": "running", "control": "control",
              "variants": [{"name": "control", "strategy": "als", "weight": 50},
                           {"name": "treatment", "strategy": "als", "weight": 50}]}
# Both variants use the default strategy, so every app looks up the same cache keys: only the logging differs.


def feedback_phase(name: str, app, n: int) -> Phase:
    """n POST /v1/feedback through the app, timed one by one."""
    client = app.test_client()
    headers = {"Authorization": f"Bearer {KEY}"}
    latencies = np.empty(n)
    for i in range(n):
        body = {"request_id": f"bench-{i}", "customer_id": f"c{i}", "item_id": "SKU-1", "action": "accepted"}
        started = time.perf_counter()
        response = client.post("/v1/feedback", headers=headers, json=body)
        latencies[i] = time.perf_counter() - started
        if response.status_code != 202:
            raise SystemExit(f"{name}: HTTP {response.status_code}")
    return Phase(name, latencies, 0, 0)


def apps(base: Settings, workdir: Path, tag: str) -> tuple:
    """(reference app without experiments, app with one running experiment and fsync always, ... everysec)."""
    definitions = workdir / "experiments.json"
    definitions.write_text(json.dumps({"experiments": [EXPERIMENT]}), encoding="utf-8")
    with_experiment = dataclasses.replace(base, experiments_path=definitions)
    return (create_app(dataclasses.replace(base, spool_dir=workdir / f"{tag}-ref")),
            create_app(dataclasses.replace(with_experiment, spool_dir=workdir / f"{tag}-always")),
            create_app(dataclasses.replace(with_experiment, spool_dir=workdir / f"{tag}-everysec",
                                           spool_fsync="everysec")))


def run(args, workdir: Path, server: RedisServer) -> None:
    registry = build_registry(workdir, args.customers, args.items, args.interactions)
    load = zipf_customers(registry, args.requests, 1.0, seed=2)
    base = Settings(registry=registry, api_keys=frozenset({KEY}), cache_ttl=3600, redis_url=server.url)
    print(f"model: {args.customers} customers, {args.items} items; {args.requests} requests per phase (Zipf 1.0)")
    for state in ("up", "down"):
        if state == "down":
            server.kill()
        reference, always, everysec = apps(base, workdir, state)
        for app in (reference, always, everysec):  # the same cache state (full with Redis up) for every phase
            run_phase("(warm-up)", app, load)
        ref = run_phase(f"redis {state}, no experiment", reference, load)
        print(ref.line())
        print(run_phase(f"redis {state}, experiment (fsync always)", always, load).line(ref))
        print(run_phase(f"redis {state}, experiment (fsync everysec)", everysec, load).line(ref))
        post = feedback_phase(f"redis {state}, POST /v1/feedback", always, args.requests // 4)
        print(post.line(ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--interactions", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=8_000, help="per phase")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("bench-experiments needs redis-server on PATH (make redis-server installs it)")
    with tempfile.TemporaryDirectory(prefix="bench-experiments-") as tmp:
        server = RedisServer(Path(tmp))
        try:
            run(args, Path(tmp), server)
        finally:
            server.kill()


if __name__ == "__main__":
    main()
