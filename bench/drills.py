"""make drills: fault drills under load on gunicorn (2 workers) with a Redis of its own; prints a summary table.

Each drill runs client threads that ask for recommendations and post feedback and
events while a fault is injected, then waits for recovery and counts: requests sent,
errors (any non-2xx answer or failed connection; for a killed worker, the requests
that were in flight on it when it died are shown apart), and data lost (feedback and
events answered 2xx that are not in their Redis stream after recovery, found by
reading the streams). Errors and data lost must be 0 everywhere.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import API_KEY, REPO, free_port, start_gunicorn, stop, worker_pids  # noqa: E402

from recsvc import artifacts  # noqa: E402
from recsvc.cache import event_stream_key  # noqa: E402
from recsvc.cli import MALLOC_ENV  # noqa: E402
from recsvc.event_log import EVENT, FEEDBACK, RedisStreams  # noqa: E402

from redis_server import RedisServer  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CUSTOMERS, ITEMS = 20_000, 2_000


# --- model versions ---------------------------------------------------------------------------------------


def publish_model(registry: Path, seed: int, make_current: bool = True) -> str:
    """A small random factor model as a new registry version; returns its id."""
    import scipy.sparse as sp

    from recsvc.artifacts import Catalog, IdIndex, ModelBundle
    from recsvc.scoring import FactorScorer, PopularityScorer

    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(CUSTOMERS), 5)
    owned = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, rng.integers(0, ITEMS, len(rows)))),
                          shape=(CUSTOMERS, ITEMS))
    owned.sum_duplicates()
    now = dt.datetime.now(dt.timezone.utc)
    version = artifacts.new_version_id(f"{seed:08d}", now)
    bundle = ModelBundle(
        manifest={"version": version, "default_strategy": "als", "strategies": {"als": {}, "popular": {}},
                  "created_at": now.isoformat(timespec="seconds")},
        customers=IdIndex(artifacts.encode_ids(f"C{i:06d}" for i in range(CUSTOMERS))),
        items=IdIndex(artifacts.encode_ids(f"I{i:06d}" for i in range(ITEMS))),
        owned=owned,
        catalog=Catalog(np.array([f"Item {i}" for i in range(ITEMS)]),
                        np.array([f"Category {i % 10}" for i in range(ITEMS)]), np.ones(ITEMS, dtype=bool)),
        scorers={"als": FactorScorer(rng.standard_normal((CUSTOMERS, 16), dtype=np.float32),
                                     rng.standard_normal((ITEMS, 16), dtype=np.float32)),
                 "popular": PopularityScorer(rng.pareto(1.5, ITEMS).astype(np.float32))},
    )
    artifacts.write_version(registry, bundle)
    if make_current:
        artifacts.set_current(registry, version)
    return version


# --- load -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # recommend, feedback, event
    started: float
    ended: float
    status: int | None  # None: the connection failed
    key: str | None = None  # feedback request_id, or the event's customer_id
    model_version: str | None = None
    connected: float = 0.0  # when the client's keep-alive connection was opened


@dataclass
class Load:
    """Client threads sending a mix of requests until stopped; every outcome is kept."""

    base: str
    threads: int = 6
    pause: float = 0.01  # seconds between a thread's requests
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(self.threads)]

    def __enter__(self):
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for worker in self._workers:
            worker.join()

    def _run(self, n: int) -> None:
        session, rng = requests.Session(), np.random.default_rng(n + int(time.time()))
        connected = time.monotonic()  # one host, so one keep-alive connection per session
        while not self._stop.is_set():
            outcome = self._one(session, rng)
            outcome.connected = connected
            if outcome.status is None:  # as a client does after a reset: a new connection
                session, connected = requests.Session(), time.monotonic()
            with self._lock:
                self.outcomes.append(outcome)
            time.sleep(self.pause)

    def _one(self, session: requests.Session, rng) -> Outcome:
        roll, customer = rng.random(), f"C{min(int(rng.zipf(1.2)) - 1, CUSTOMERS - 1):06d}"
        item = f"I{rng.integers(0, ITEMS):06d}"
        if roll < 0.2:
            key = uuid.uuid4().hex
            kind, method, path = "feedback", "POST", "/v1/feedback"
            body = {"request_id": key, "customer_id": customer, "item_id": item, "action": "accepted"}
        elif roll < 0.3:
            key = customer = f"drill-{uuid.uuid4().hex}"  # a unique customer finds the event in the stream
            kind, method, path = "event", "POST", "/v1/events"
            body = [{"customer_id": customer, "item_id": item, "event_type": "purchase"}]
        else:
            key, kind, method, body = None, "recommend", "GET", None
            path = f"/v1/customers/{customer}/recommendations?limit=5"
        started = time.monotonic()
        try:
            response = session.request(method, self.base + path, json=body, headers=AUTH, timeout=10)
        except requests.RequestException:
            session.close()
            return Outcome(kind, started, time.monotonic(), None, key)
        version = response.json().get("model_version") if kind == "recommend" and response.ok else None
        return Outcome(kind, started, time.monotonic(), response.status_code, key, version)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


# --- the system under test -----------------------------------------------------------------------------


@dataclass
class Row:
    drill: str
    sent: int
    errors: int
    lost: int
    note: str


class Drills:
    def __init__(self, work: Path, seconds: float):
        self.work, self.seconds = work, seconds
        self.registry = work / "registry"
        self.first_version = publish_model(self.registry, 1)
        (work / "redis").mkdir()
        self.redis = RedisServer(work / "redis", appendonly=True)
        self.streams = RedisStreams(redis.Redis.from_url(self.redis.url, socket_timeout=10), 86400)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **MALLOC_ENV, "OPENBLAS_NUM_THREADS": "1", "RECSVC_REGISTRY": str(self.registry),
               "RECSVC_API_KEYS": API_KEY, "RECSVC_LOG_LEVEL": "warning", "PYTHONPATH": str(REPO),
               "RECSVC_REDIS_URL": self.redis.url, "RECSVC_SPOOL_DIR": str(work / "spool"),
               "RECSVC_RELOAD_INTERVAL": "0.5"}
        self.server = start_gunicorn("recsvc.wsgi:app", self.port, env, work / "recsvc.log")

    def close(self) -> None:
        stop(self.server)
        self.redis.kill()

    # Each drill: load for a while, the fault, recovery, more load; returns a note for the table.

    def run(self, name: str, fault) -> Row:
        print(f"drill: {name} ...", flush=True)
        with Load(self.base) as load:
            time.sleep(self.seconds / 3)
            note, in_flight = fault(load)
            time.sleep(self.seconds / 3)
        outcomes = load.snapshot()
        failed = [o for o in outcomes if o.status is None or o.status >= 300]
        # In flight on a killed worker: a request on a connection it held (opened before the kill) that failed
        # after the kill; the client then reconnects, so each connection is excused once at most.
        excused = [o for o in failed if in_flight and o.status is None and o.connected <= in_flight <= o.ended]
        lost = self.lost(outcomes)
        if excused:
            note += f"; {len(excused)} requests in flight on its connections failed (not counted as errors)"
        return Row(name, len(outcomes), len(failed) - len(excused), lost, note)

    def lost(self, outcomes: list[Outcome]) -> int:
        """Feedback and events answered 2xx that are not in their stream once the spool has been replayed."""
        accepted = {(o.kind, o.key) for o in outcomes if o.key and o.status is not None and o.status < 300}
        self.wait_for_replay()
        stored = {("feedback", r["request_id"]) for r in self.streams.read(FEEDBACK)}
        stored |= {("event", r["customer_id"]) for r in self.streams.read(EVENT)}
        return len(accepted - stored)

    def wait_for_replay(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        spool = self.work / "spool"
        while time.monotonic() < deadline and any(p.stat().st_size for p in spool.glob("*.spool")):
            time.sleep(0.5)
        time.sleep(1.5)  # a worker's own open spool file is rotated and replayed within its next round

    def served_versions(self, load: Load, since: float) -> set[str]:
        return {o.model_version for o in load.snapshot() if o.started >= since and o.model_version}

    def wait_for_version(self, load: Load, version: str, timeout: float = 30.0) -> float:
        """Seconds until both workers answer with `version` (the last 40 answers all carry it)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            recent = [o.model_version for o in load.snapshot()[-40:] if o.model_version]
            if len(recent) >= 20 and set(recent) == {version}:
                return time.monotonic() - started
            time.sleep(0.2)
        raise SystemExit(f"the servers did not switch to {version} within {timeout:.0f} s")

    def redis_killed(self, load: Load):
        self.redis.kill()
        down = time.monotonic()
        time.sleep(self.seconds / 3)
        spooled = sum(p.stat().st_size > 0 for p in (self.work / "spool").glob("*.spool"))
        up = time.monotonic()
        self.redis.start()
        kept = sum(1 for o in load.snapshot() if o.key and o.status == 202 and down <= o.started <= up)
        return f"Redis down {up - down:.1f} s (SIGKILL, restarted from its AOF); {kept} feedback/events " \
               f"accepted meanwhile into {spooled} spool files, replayed after", None

    def redis_full(self, load: Load):
        client = redis.Redis.from_url(self.redis.url)
        client.config_set("maxmemory-policy", "volatile-lru")  # as in docker-compose.yml
        streams_before = self.stream_entries(client)
        evicted_before = client.info("stats")["evicted_keys"]
        full = time.monotonic()
        client.config_set("maxmemory", "1")  # below any content: every key with a TTL goes, then writes fail
        time.sleep(self.seconds / 3)
        streams_during = self.stream_entries(client)
        raised = time.monotonic()
        client.config_set("maxmemory", "0")
        evicted = client.info("stats")["evicted_keys"] - evicted_before
        kept = sum(1 for o in load.snapshot() if o.key and o.status == 202 and full <= o.started <= raised)
        if streams_during < streams_before:
            raise SystemExit(f"Redis full: the streams lost entries ({streams_before} -> {streams_during})")
        return f"volatile-lru: {evicted} cache keys evicted, streams kept ({streams_before} -> {streams_during} " \
               f"entries); {kept} feedback/events accepted while full, spooled, replayed after", None

    @staticmethod
    def stream_entries(client: redis.Redis) -> int:
        return sum(client.xlen(event_stream_key(kind)) for kind in (FEEDBACK, EVENT))

    def new_model(self, load: Load):
        previous = self.current_version()
        version = publish_model(self.registry, 2)
        seconds = self.wait_for_version(load, version)
        return f"{previous[-8:]} -> {version[-8:]}: both workers on it after {seconds:.1f} s", None

    def corrupt_model(self, load: Load):
        serving = self.current_version()
        version = publish_model(self.registry, 3, make_current=False)
        items = self.registry / "versions" / version / "items.npy"
        items.write_bytes(items.read_bytes()[:64])  # truncated: its header promises more than is there
        since = time.monotonic()
        artifacts.set_current(self.registry, version)
        time.sleep(self.seconds / 3)
        served = self.served_versions(load, since)
        refused = requests.get(self.base + "/readyz", timeout=5).json().get("last_load_failure") or {}
        artifacts.set_current(self.registry, serving)  # the operator's rollback
        if served != {serving} or refused.get("version") != version:
            raise SystemExit(f"corrupt version: served {served}, readyz last_load_failure {refused}")
        return f"refused (readyz: {refused['reason'][:40]}...); kept serving {serving[-8:]}", None

    def registry_unreadable(self, load: Load):
        serving, pointer = self.current_version(), self.registry / artifacts.CURRENT_POINTER
        moved = self.registry.with_name("CURRENT.moved")
        pointer.rename(moved)
        pointer.mkdir()  # CURRENT is now a directory: reading it fails even for root, unlike chmod 000
        since = time.monotonic()
        time.sleep(self.seconds / 3)
        served = self.served_versions(load, since)
        failure = requests.get(self.base + "/readyz", timeout=5).json().get("last_load_failure") or {}
        pointer.rmdir()
        moved.rename(pointer)
        if served != {serving}:
            raise SystemExit(f"registry unreadable: served {served}")
        reason = failure.get("reason", "")[:40]
        return f"CURRENT replaced by a directory; kept serving {serving[-8:]} (readyz: {reason})", None

    def registry_gone(self, load: Load):
        serving, hidden = self.current_version(), self.registry.with_name("registry.away")
        self.registry.rename(hidden)  # the mapped arrays stay valid; the watcher finds no registry
        since = time.monotonic()
        time.sleep(self.seconds / 3)
        served = self.served_versions(load, since)
        hidden.rename(self.registry)
        if served != {serving}:
            raise SystemExit(f"registry gone: served {served}")
        return f"registry directory renamed away for {self.seconds / 3:.0f} s; kept serving {serving[-8:]}", None

    def worker_killed(self, load: Load):
        before = worker_pids(self.server.pid)
        victim = before[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            after = worker_pids(self.server.pid)
            if len(after) == len(before) and victim not in after and self.ready():
                break
            time.sleep(0.2)
        else:
            raise SystemExit("gunicorn did not replace the killed worker")
        return f"worker {victim} SIGKILLed, replaced by {sorted(set(after) - set(before))} " \
               f"in {time.monotonic() - killed_at:.1f} s", killed_at

    def ready(self) -> bool:
        try:
            return requests.get(self.base + "/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def current_version(self) -> str:
        return artifacts.current_version(self.registry)


DRILLS = [("Redis killed and restarted", "redis_killed"), ("Redis full (maxmemory)", "redis_full"),
          ("new model published", "new_model"), ("corrupt model published", "corrupt_model"),
          ("registry unreadable", "registry_unreadable"), ("registry moved away", "registry_gone"),
          ("gunicorn worker killed", "worker_killed")]


def print_table(rows: list[Row]) -> bool:
    print(f"\n{'drill':28} {'requests sent':>13} {'errors':>7} {'data lost':>9}  note")
    for row in rows:
        print(f"{row.drill:28} {row.sent:13d} {row.errors:7d} {row.lost:9d}  {row.note}")
    ok = all(row.errors == 0 and row.lost == 0 for row in rows)
    print(f"\nall drills with 0 errors and 0 data lost: {'yes' if ok else 'NO'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=9.0, help="length of each drill (load before, during, after)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("make drills needs redis-server on PATH (make redis-server installs it)")
    with tempfile.TemporaryDirectory(prefix="recsvc-drills-") as tmp:
        drills = Drills(Path(tmp), args.seconds)
        try:
            rows = [drills.run(name, getattr(drills, method)) for name, method in DRILLS]
        finally:
            drills.close()
    sys.exit(0 if print_table(rows) else 1)


if __name__ == "__main__":
    main()
