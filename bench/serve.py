"""make bench-serve: recsvc under gunicorn (2 workers) against a bare Flask hello app, with wrk, in one run.

Prints: cached GET throughput as a ratio to the hello endpoint served with the same
gunicorn settings (target >= 0.85), the median of many short alternating pairs of runs
with its spread; uncached p50/p99 on a 100k items x 100k customers x 64 factors model
at 8 connections (target p99 <= 15 ms), with the workers' CPU time per request; RSS, PSS and private memory of each
worker after the load against the model's array size, and what the private memory is made of
(target: a worker adds < 20% of the arrays).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from flask import Flask, jsonify  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
API_KEY = "bench-api-key-0001"
TARGET_RATIO, TARGET_P99_MS, TARGET_WORKER_SHARE = 0.85, 15.0, 0.20

# The reference: the thinnest JSON endpoint Flask can serve. gunicorn imports it as serve:hello_app.
hello_app = Flask("hello")


@hello_app.get("/hello")
def hello():
    return jsonify(message="hello")


# --- the model ----------------------------------------------------------------------------------------


def write_model(registry: Path, customers: int, items: int, factors: int, owned_per_customer: int) -> int:
    """Publish a random model of the given size; returns the bytes of its arrays on disk."""
    import numpy as np
    import scipy.sparse as sp

    from recsvc import artifacts
    from recsvc.artifacts import Catalog, IdIndex, ModelBundle
    from recsvc.scoring import FactorScorer, PopularityScorer

    rng = np.random.default_rng(7)
    rows = np.repeat(np.arange(customers), owned_per_customer)
    cols = rng.integers(0, items, size=len(rows))
    owned = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(customers, items))
    owned.sum_duplicates()
    bundle = ModelBundle(
        manifest={"version": "vbench", "default_strategy": "als", "strategies": {"als": {}, "popular": {}},
                  "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
        customers=IdIndex(artifacts.encode_ids(f"C{i:06d}" for i in range(customers))),
        items=IdIndex(artifacts.encode_ids(f"I{i:06d}" for i in range(items))),
        owned=owned,
        catalog=Catalog(np.array([f"Item {i}" for i in range(items)]),
                        np.array([f"Category {i % 20}" for i in range(items)]), rng.random(items) > 0.02),
        scorers={"als": FactorScorer(rng.standard_normal((customers, factors), dtype=np.float32) * 0.1,
                                     rng.standard_normal((items, factors), dtype=np.float32) * 0.1),
                 "popular": PopularityScorer(rng.pareto(1.5, items).astype(np.float32))},
    )
    path = artifacts.write_version(registry, bundle)
    artifacts.set_current(registry, bundle.version)
    return sum(p.stat().st_size for p in path.rglob("*.npy"))


# --- processes ------------------------------------------------------------------------------------------


def find_wrk() -> str:
    """wrk on PATH, or installed from Debian when we may (root with apt-get); otherwise stop with a message."""
    found = shutil.which("wrk")
    if found:
        print(f"load generator: {found} (found)")
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("load generator: wrk not found, installing it with apt-get (Debian package 'wrk') ...")
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
    if not found:
        sys.exit("wrk is needed: install it with `sudo apt-get install wrk` and run `make bench-serve` again")
    print(f"load generator: {found} (installed)")
    return found


def start_gunicorn(app: str, port: int, env: dict, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:recsvc.gunicorn_conf", "--bind", f"127.0.0.1:{port}",
            "--workers", "2", "--pythonpath", str(REPO / "bench"), app]
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    wait_until_up(f"http://127.0.0.1:{port}/readyz" if "recsvc" in app else f"http://127.0.0.1:{port}/hello",
                  process, log)
    return process


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    stop(process)
    sys.exit(f"server did not start; its log:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def memory_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and private (Private_Clean + Private_Dirty) of a process, in KiB, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[name] = int(rest.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "private": fields["Private_Clean"] + fields["Private_Dirty"],
            **mappings_kib(pid)}


# The shared memory the master maps before forking: model arrays (.npy files) and the embedded cache's table
# (a memfd named recsvc-cache, recsvc/shared_table.py).
MAPPINGS = {"model": lambda name: name.endswith(".npy"), "cache": lambda name: "/memfd:recsvc-cache" in name}


def mappings_kib(pid: int) -> dict[str, int]:
    """Resident and private KiB of the process's mappings of model files and of the embedded cache, from smaps."""
    found = {f"{kind}_{field}": 0 for kind in MAPPINGS for field in ("rss", "private")}
    kind = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            name = line.rstrip()
            kind = next((k for k, matches in MAPPINGS.items() if matches(name)), None)
        elif kind and line.startswith("Rss:"):
            found[f"{kind}_rss"] += int(line.split()[1])
        elif kind and line.startswith(("Private_Clean:", "Private_Dirty:")):
            found[f"{kind}_private"] += int(line.split()[1])
    return found


# --- load ---------------------------------------------------------------------------------------------------

# Every request asks for a customer no earlier request in the run asked for: each answer is computed.
UNCACHED_SCRIPT = """
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
function init(args) counter = 0 end
request = function()
  counter = counter + 1
  local customer = (%(start)d + id + counter * %(threads)d) %% %(customers)d
  return wrk.format("GET", string.format("/v1/customers/C%%06d/recommendations?limit=10", customer),
                    {["Authorization"] = "Bearer %(key)s"})
end
"""


def run_wrk(wrk: str, url: str, seconds: int, connections: int, threads: int = 2, script: Path | None = None,
            headers: dict | None = None) -> dict:
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    if script:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> dict:
    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    percentiles = {m.group(1): ms(m.group(2)) for m in re.finditer(r"^\s+(\d+)%\s+(\S+)", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": percentiles.get("50"), "p99": percentiles.get("99"),
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else None}


# --- the run -----------------------------------------------------------------------------------------------


def measure(wrk: str, work: Path, env: dict, args: argparse.Namespace) -> dict:
    """Both servers run side by side and take turns under load, in pairs of short runs; each pair gives one
    ratio. The order alternates (hello first, then cached first) so a drift in the machine's speed falls on
    both alike, and the median over many pairs is robust to a run that another process slowed down."""
    hello_port, port = free_port(), free_port()
    hello_server = start_gunicorn("serve:hello_app", hello_port, env, work / "hello.log")
    server = start_gunicorn("recsvc.wsgi:app", port, env, work / "recsvc.log")
    try:
        hello_url = f"http://127.0.0.1:{hello_port}/hello"
        cached_url = f"http://127.0.0.1:{port}/v1/customers/C000001/recommendations?limit=10"
        auth = {"Authorization": f"Bearer {API_KEY}"}
        run_wrk(wrk, hello_url, 2, 16)  # warm-ups; the second also fills the cache
        run_wrk(wrk, cached_url, 2, 16, headers=auth)
        hello, cached = [], []
        for pair in range(args.rounds):
            runs = {"hello": lambda: with_worker_cpu(hello_server, lambda: run_wrk(wrk, hello_url, args.seconds, 16)),
                    "cached": lambda: with_worker_cpu(server, lambda: run_wrk(wrk, cached_url, args.seconds, 16,
                                                                             headers=auth))}
            order = ("hello", "cached") if pair % 2 == 0 else ("cached", "hello")
            result = {name: runs[name]() for name in order}
            hello.append(result["hello"])
            cached.append(result["cached"])
        stop(hello_server)
        uncached = measure_uncached(wrk, work, f"http://127.0.0.1:{port}", args.uncached_seconds, args.customers,
                                    worker_pids(server.pid))
        memory = {pid: memory_kib(pid) for pid in worker_pids(server.pid)}
        return {"hello": hello, "cached": cached, "uncached": uncached, "memory": memory,
                "metrics": _fetch(f"http://127.0.0.1:{port}/metrics")}
    finally:
        stop(hello_server)
        stop(server)


def with_worker_cpu(server: subprocess.Popen, run) -> dict:
    """run()'s wrk result with `one_sided`: True when one worker did almost none of the work (under 10% of the
    workers' CPU time). wrk opens its connections at once, and on 2 busy cores one worker sometimes accepts all
    of them; such a run measures gunicorn's accept race, not the app."""
    pids = worker_pids(server.pid)
    before = [cpu_seconds(pid) for pid in pids]
    result = run()
    used = [cpu_seconds(pid) - start for pid, start in zip(pids, before)]
    return {**result, "one_sided": min(used) < 0.1 * sum(used)}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, from /proc/<pid>/stat."""
    return sum(usage(pid)[:2])


def usage(pid: int) -> tuple[float, float, int]:
    """(user CPU seconds, system CPU seconds, minor page faults) of a process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def measure_uncached(wrk: str, work: Path, base: str, seconds: int, customers: int, workers: list[int]) -> dict:
    """The measured run's wrk result, with the workers' CPU milliseconds (all, and system) and minor page faults
    per request."""
    result, before = {}, []
    for name, start in (("warm-up", customers // 2), ("measured", 0)):
        script = work / f"uncached-{name}.lua"
        script.write_text(UNCACHED_SCRIPT % {"start": start, "threads": 2, "customers": customers, "key": API_KEY})
        before = [usage(pid) for pid in workers]
        result = run_wrk(wrk, base, 2 if name == "warm-up" else seconds, 8, script=script)
    used = [sum(now[i] - then[i] for now, then in zip(map(usage, workers), before)) for i in range(3)]
    per_request = [value / max(result["requests"], 1) for value in used]
    return {**result, "cpu_ms": 1000 * (per_request[0] + per_request[1]), "system_ms": 1000 * per_request[1],
            "faults": per_request[2]}


def _fetch(url: str) -> str:
    import requests

    return requests.get(url, timeout=10).text


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of `values` (q in 0..1)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def report(served: dict, model_bytes: int) -> bool:
    hello, cached, uncached = served["hello"], served["cached"], served["uncached"]
    ratios = [c["rps"] / h["rps"] for h, c in zip(hello, cached)]
    ratio = quantile(ratios, 0.5)
    for name, runs in (("hello (bare Flask JSON)", hello), ("recsvc cached GET", cached)):
        rps = [r["rps"] for r in runs]
        print(f"{name:24} median {quantile(rps, 0.5):6.0f} req/s over {len(runs)} runs (min {min(rps):.0f}, "
              f"max {max(rps):.0f}); median p50 {quantile([r['p50'] for r in runs], 0.5):.2f} ms, "
              f"p99 {quantile([r['p99'] for r in runs], 0.5):.2f} ms")
    print(f"  cached / hello throughput ratio, one per pair of runs: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"  ratio median {ratio:.3f}  (target >= {TARGET_RATIO}); spread: middle half "
          f"{quantile(ratios, 0.25):.3f}-{quantile(ratios, 0.75):.3f}, all {min(ratios):.3f}-{max(ratios):.3f}")
    balanced = [r for r, h, c in zip(ratios, hello, cached) if not (h["one_sided"] or c["one_sided"])]
    print(f"  runs in which one worker did almost nothing (all connections on the other): hello "
          f"{sum(h['one_sided'] for h in hello)}, cached {sum(c['one_sided'] for c in cached)} of {len(hello)}; "
          + (f"median ratio of the {len(balanced)} pairs without one: {quantile(balanced, 0.5):.3f}" if balanced
             else "no pair without one"))
    print(f"recsvc uncached GET, 8 connections: {uncached['rps']:.0f} req/s  p50 {uncached['p50']:.2f} ms  "
          f"p99 {uncached['p99']:.2f} ms  (target p99 <= {TARGET_P99_MS} ms)")
    print(f"  workers' CPU per request {uncached['cpu_ms']:.3f} ms (system {uncached['system_ms']:.3f} ms), "
          f"{uncached['faults']:.1f} minor page faults per request")
    runs = [*hello, *cached, uncached]
    print(f"  non-2xx responses in all runs: {sum(r['non_2xx'] for r in runs)}; socket errors: "
          f"{[r['socket_errors'] for r in runs if r['socket_errors']] or 'none'}")
    print(f"  cache lookups on the server: {_metric_sum(served['metrics'], 'recsvc_cache_lookups_total', 'hit'):.0f} "
          f"hits, {_metric_sum(served['metrics'], 'recsvc_cache_lookups_total', 'miss'):.0f} misses")
    worst_share = memory_report(served["memory"], model_bytes, served["metrics"])
    ok = ratio >= TARGET_RATIO and uncached["p99"] <= TARGET_P99_MS and worst_share < TARGET_WORKER_SHARE
    print(f"\nall targets met: {'yes' if ok else 'NO'}")
    return ok


def memory_report(memory: dict[int, dict[str, int]], model_bytes: int, metrics_text: str) -> float:
    """Each worker's memory after the load, and what its private part is made of; returns the worst share
    of the model arrays that a worker adds."""
    model_mib = model_bytes / 2**20
    print(f"\nmodel arrays on disk: {model_mib:.1f} MiB (memory-mapped, shared through the page cache)")
    worst = 0.0
    for pid, kib in memory.items():
        # Pages of the model files, or of the embedded cache's shared table, that only this worker has touched
        # count as its private memory, but they are the one copy every other worker reads too: not added by
        # this worker. The table is counted once, for the server, below.
        added = (kib["private"] - kib["model_private"] - kib["cache_private"]) * 1024
        worst = max(worst, added / model_bytes)
        print(f"  worker {pid}: RSS {kib['rss'] / 1024:6.1f} MiB  PSS {kib['pss'] / 1024:6.1f} MiB  private "
              f"{kib['private'] / 1024:5.1f} MiB; model files mapped: {kib['model_rss'] / 1024:.1f} MiB resident, "
              f"{kib['model_private'] / 1024:.1f} MiB of it touched by this worker alone; embedded cache table: "
              f"{kib['cache_rss'] / 1024:.1f} MiB resident, {kib['cache_private'] / 1024:.1f} MiB touched by it alone")
        print(f"    added by the worker:  {added / 2**20:5.1f} MiB = {added / model_bytes:.1%} of the model arrays "
              f"(pages of the master's Python objects copied on write, thread stacks, malloc)")
    cache_bytes = _gauge(metrics_text, "recsvc_local_cache_bytes")
    resident = max((kib["cache_rss"] for kib in memory.values()), default=0) / 1024
    print(f"  embedded cache, one table shared by all workers (counted once, whatever the number of workers): "
          f"{_gauge(metrics_text, 'recsvc_local_cache_entries'):.0f} lists in {cache_bytes / 2**20:.1f} MiB of slots, "
          f"{resident:.1f} MiB of the table resident")
    print(f"  an extra worker adds at most {worst:.1%} of the model arrays (target < {TARGET_WORKER_SHARE:.0%})")
    return worst


def _gauge(text: str, name: str) -> float:
    """The value of a gauge with one series (the embedded cache's: one table for all workers), 0 when absent."""
    for line in text.splitlines():
        match = re.match(name + r"(?:\{[^}]*\})? (\S+)$", line)
        if match:
            return float(match.group(1))
    return 0.0


def _metric_sum(text: str, name: str, result: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and f'result="{result}"' in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=2, help="length of each hello or cached throughput run")
    parser.add_argument("--rounds", type=int, default=15, help="pairs of hello and cached runs (order alternates)")
    parser.add_argument("--uncached-seconds", type=int, default=10, help="length of the uncached latency run")
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--factors", type=int, default=64)
    args = parser.parse_args()
    wrk = find_wrk()
    with tempfile.TemporaryDirectory(prefix="recsvc-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model_bytes = write_model(work / "registry", args.customers, args.items, args.factors, 20)
        print(f"model: {args.customers} customers x {args.items} items x {args.factors} factors, "
              f"written in {time.perf_counter() - t0:.1f}s")
        from recsvc.cli import MALLOC_ENV  # the environment `recsvc serve` gives gunicorn, for both apps

        env = {**os.environ, **MALLOC_ENV, "OPENBLAS_NUM_THREADS": "1", "RECSVC_REGISTRY": str(work / "registry"),
               "RECSVC_API_KEYS": API_KEY, "RECSVC_LOG_LEVEL": "warning", "PYTHONPATH": str(REPO)}
        served = measure(wrk, work, env, args)
    sys.exit(0 if report(served, model_bytes) else 1)


if __name__ == "__main__":
    main()
