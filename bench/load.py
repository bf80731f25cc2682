"""make bench-load: 60 s of Zipf-distributed customers at a sustained rate on gunicorn (2 workers) with Redis.

The mix is what an agent desktop sends: mostly GET recommendations, some feedback and
events. Customers are drawn from a Zipf law over 100,000 known customers, plus walk-ins
the model does not know. Prints p50 and p99 of recsvc and, as the reference measured in
the same run at the same rate, of a bare Flask JSON endpoint under the same gunicorn
settings; counts errors (non-2xx and socket errors, target 0) and checks that every
feedback and event answered 202 is in its Redis stream (target: none missing).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import redis  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import API_KEY, REPO, find_wrk, free_port, parse_wrk, start_gunicorn, stop, write_model  # noqa: E402

from recsvc.cache import event_stream_key  # noqa: E402
from recsvc.cli import MALLOC_ENV  # noqa: E402

from redis_server import RedisServer  # noqa: E402

# wrk (plain, not wrk2) has no rate option: each connection waits an exponential (Poisson) gap before its next
# request, mean connections / rate. Every 202 (feedback and events only) is counted so the run can check the
# streams. Customers: rank r of the Zipf law is C{r:06d}; a share are walk-ins (W...) the model does not know.
LOAD_SCRIPT = """
local threads, n = {}, 0
function setup(thread) n = n + 1; thread:set("id", n); table.insert(threads, thread) end
function init(args)
  math.randomseed(%(seed)d + id * 7919)
  accepted, sent = 0, 0
  cdf, total = {}, 0
  for k = 1, %(customers)d do total = total + 1 / k ^ %(exponent)f; cdf[k] = total end
end
local function zipf_rank()
  local u, lo, hi = math.random() * total, 1, %(customers)d
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo - 1
end
local headers = {["Authorization"] = "Bearer %(key)s", ["Content-Type"] = "application/json"}
function delay() return -math.log(1 - math.random()) * %(mean_gap_ms)f end
request = function()
  sent = sent + 1
  local customer = string.format("C%%06d", zipf_rank())
  if math.random() < %(walk_in)f then customer = string.format("W%%d-%%d", id, sent) end
  local item = string.format("I%%06d", math.random(0, %(items)d - 1))
  local r = math.random()
  if r < %(feedback)f then
    local body = string.format(
      '{"request_id":"load%(run)d-%%d-%%d","customer_id":"%%s","item_id":"%%s","action":"%%s"}',
                               id, sent, customer, item, math.random() < 0.3 and "accepted" or "shown")
    return wrk.format("POST", "/v1/feedback", headers, body)
  elseif r < %(feedback)f + %(events)f then
    local body = string.format('[{"customer_id":"%%s","item_id":"%%s","event_type":"view"}]', customer, item)
    return wrk.format("POST", "/v1/events", headers, body)
  end
  return wrk.format("GET", "/v1/customers/" .. customer .. "/recommendations?limit=10", headers)
end
function response(status, headers, body) if status == 202 then accepted = accepted + 1 end end
function done(summary, latency, requests)
  local all = 0
  for _, thread in ipairs(threads) do all = all + thread:get("accepted") end
  io.write(string.format("ACCEPTED %%d\\n", all))
end
"""

# The reference: the same paced connections against a bare Flask JSON endpoint.
HELLO_SCRIPT = """
function delay() return -math.log(1 - math.random()) * %(mean_gap_ms)f end
"""


def run_paced(wrk: str, url: str, script: Path, seconds: int, connections: int) -> tuple[dict, str]:
    argv = [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out), out


def stream_length(url: str) -> int:
    client = redis.Redis.from_url(url)
    return sum(client.xlen(event_stream_key(kind)) for kind in ("feedback", "event"))


def settled_stream_length(url: str, spool: Path, timeout: float = 30.0) -> int:
    """Records in the streams once the spool is empty: a record spooled while Redis was slow to answer (the
    event log's timeout is 50 ms) reaches its stream within the replay interval (1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(path.stat().st_size for path in spool.glob("*.spool")):
        time.sleep(0.5)
    time.sleep(1.0)
    return stream_length(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second, all connections together")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the customers asked for")
    parser.add_argument("--reference-seconds", type=int, default=20, help="length of the bare Flask reference run")
    args = parser.parse_args()
    wrk = find_wrk()
    with tempfile.TemporaryDirectory(prefix="recsvc-load-") as tmp:
        ok = run(args, wrk, Path(tmp))
    sys.exit(0 if ok else 1)


def run(args, wrk: str, work: Path) -> bool:
    write_model(work / "registry", args.customers, args.items, 64, 20)
    redis_server = RedisServer(work)
    env = {**os.environ, **MALLOC_ENV, "OPENBLAS_NUM_THREADS": "1", "RECSVC_REGISTRY": str(work / "registry"),
           "RECSVC_API_KEYS": API_KEY, "RECSVC_LOG_LEVEL": "warning", "PYTHONPATH": str(REPO),
           "RECSVC_REDIS_URL": redis_server.url, "RECSVC_SPOOL_DIR": str(work / "spool")}
    gap = args.connections / args.rate * 1000
    values = dict(seed=11, customers=args.customers, items=args.items, exponent=args.zipf, key=API_KEY,
                  mean_gap_ms=gap, walk_in=0.05, feedback=0.10, events=0.05)
    # Each run its own seed and request ids: a repeated (request_id, customer, item, action) counts once.
    (work / "warm.lua").write_text(LOAD_SCRIPT % {**values, "run": 1, "seed": 12})
    (work / "load.lua").write_text(LOAD_SCRIPT % {**values, "run": 2})
    (work / "hello.lua").write_text(HELLO_SCRIPT % values)
    port, hello_port = free_port(), free_port()
    server = start_gunicorn("recsvc.wsgi:app", port, env, work / "recsvc.log")
    hello = start_gunicorn("serve:hello_app", hello_port, env, work / "hello.log")
    try:
        reference, _ = run_paced(wrk, f"http://127.0.0.1:{hello_port}/hello", work / "hello.lua",
                                 args.reference_seconds, args.connections)
        stop(hello)
        print(f"5 s warm-up (counted for errors and data, not for latency), then {args.seconds} s at "
              f"{args.rate:.0f} req/s target, {args.connections} connections, "
              f"Zipf s={args.zipf} over {args.customers} customers ...", flush=True)
        warm_up, warm_out = run_paced(wrk, f"http://127.0.0.1:{port}", work / "warm.lua", 5, args.connections)
        result, out = run_paced(wrk, f"http://127.0.0.1:{port}", work / "load.lua", args.seconds, args.connections)
        value, unit = re.search(r"requests in ([\d.]+)(ms|s|m)", out).groups()
        elapsed = float(value) * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]
        accepted = sum(int(re.search(r"ACCEPTED (\d+)", text).group(1)) for text in (warm_out, out))
        result["non_2xx"] += warm_up["non_2xx"]
        result["socket_errors"] = result["socket_errors"] or warm_up["socket_errors"]
        stored = settled_stream_length(redis_server.url, work / "spool")
    finally:
        stop(hello)
        stop(server)
        redis_server.kill()
    return report(args, result, reference, elapsed, accepted, stored)


def report(args, result: dict, reference: dict, elapsed: float, accepted: int, stored: int) -> bool:
    errors = result["non_2xx"] + (0 if result["socket_errors"] is None else 1)
    print(f"\nrecsvc (gunicorn 2 workers, Redis cache and event log): {result['requests']} requests in "
          f"{elapsed:.0f} s = {result['requests'] / elapsed:.0f} req/s sustained (target {args.rate:.0f})")
    print(f"  p50 {result['p50']:.2f} ms   p99 {result['p99']:.2f} ms")
    print(f"  reference, bare Flask JSON at the same rate: p50 {reference['p50']:.2f} ms   "
          f"p99 {reference['p99']:.2f} ms   -> recsvc p99 = {result['p99'] / reference['p99']:.2f} x reference")
    print(f"  errors: {result['non_2xx']} non-2xx, socket errors: {result['socket_errors'] or 'none'}  (target 0)")
    print(f"  feedback and events answered 202: {accepted}; in the Redis streams: {stored}; "
          f"missing: {max(0, accepted - stored)}  (target 0)")
    ok = errors == 0 and stored >= accepted
    print(f"\nzero errors and nothing lost: {'yes' if ok else 'NO'}")
    return ok


if __name__ == "__main__":
    main()
