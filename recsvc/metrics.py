"""Prometheus metrics of the server: the one place they are defined, exported at /metrics.

Under gunicorn each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR
(set up by recsvc/gunicorn_conf.py) and /metrics merges every worker's files, so
a scrape sees the whole server whichever worker answers it. Without that
variable (tests, a single process) the default in-process registry is used.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Buckets in seconds around the agents' budget: most answers well under 50 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUEST_SECONDS = Histogram("recsvc_request_seconds", "Time to answer a request, by endpoint",
                            ["endpoint", "method"], buckets=LATENCY_BUCKETS)
RESPONSES = Counter("recsvc_responses_total", "Responses by endpoint and HTTP status", ["endpoint", "status"])
CACHE_LOOKUPS = Counter("recsvc_cache_lookups_total", "Recommendation cache lookups", ["result"])
# Redis cache health (recsvc/cache.py): breaker 0 closed, 1 half-open, 2 open; the worst worker wins.
REDIS_BREAKER = Gauge("recsvc_redis_breaker_state", "Redis circuit breaker: 0 closed, 1 half-open, 2 open",
                      multiprocess_mode="max")
# The breaker of writes alone: it opens when writes fail while reads still answer (a write-only stall).
REDIS_WRITE_BREAKER = Gauge("recsvc_redis_write_breaker_state",
                            "Redis circuit breaker of writes: 0 closed, 1 half-open, 2 open", multiprocess_mode="max")
REDIS_ERRORS = Counter("recsvc_redis_errors_total", "Redis commands that failed or timed out", ["operation"])
CACHE_COALESCED = Counter("recsvc_cache_coalesced_total",
                          "Requests that waited for another request's computation of the same list")
CACHE_OVERSIZE = Counter("recsvc_cache_oversize_total", "Lists not cached because they passed the entry size bound")
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
# The embedded cache (no Redis): one table in shared memory for all workers, so one series, not one per worker:
# the worker that answers a scrape of /metrics sets it from the whole table, and the most recent value wins.
LOCAL_CACHE_ENTRIES = Gauge("recsvc_local_cache_entries",
                            "Lists in the server's embedded cache (shared by its workers)",
                            multiprocess_mode="livemostrecent")
LOCAL_CACHE_BYTES = Gauge("recsvc_local_cache_bytes",
                          "Bytes of the embedded cache's slots in use (lists and generations; shared by the workers)",
                          multiprocess_mode="livemostrecent")
FALLBACK_SOURCES = Counter("recsvc_recommendation_source_total",
                           "Computed recommendation lists by the step of the fallback chain that answered first",
                           ["source"])
MODEL_INFO = Gauge("recsvc_model_info", "1 for the model version a worker serves", ["version"],
                   multiprocess_mode="liveall")
MODEL_CREATED = Gauge("recsvc_model_created_timestamp_seconds", "When the served model version was trained",
                      multiprocess_mode="livemax")
MODEL_AGE = Gauge("recsvc_model_age_seconds", "Age of the served model version, updated every reload check",
                  multiprocess_mode="livemax")
MODEL_LOADS = Counter("recsvc_model_loads_total", "Model versions loaded and swapped in")
MODEL_LOAD_FAILURES = Counter("recsvc_model_load_failures_total",
                              "Model versions refused because they failed to load or validate")
# Experiment definitions (RECSVC_EXPERIMENTS), re-read by each worker when the file changes (recsvc/experiments.py).
EXPERIMENTS_INFO = Gauge("recsvc_experiments_info", "1 for the digest of the experiment definitions a worker uses",
                         ["digest"], multiprocess_mode="liveall")
EXPERIMENTS_LOADS = Counter("recsvc_experiments_loads_total",
                            "Experiment definitions loaded: at start-up and after each change of the file")
EXPERIMENTS_LOAD_FAILURES = Counter("recsvc_experiments_load_failures_total",
                                    "Changed experiments files refused (unreadable, missing or invalid)")
EXPERIMENTS_REFUSED = Gauge("recsvc_experiments_file_refused",
                            "1 while the experiments file on disk is refused and older definitions serve",
                            multiprocess_mode="livemax")
EVENT_LOG_RECORDS = Counter("recsvc_event_log_records_total",
                            "Exposures, feedback and events kept, by kind and where (redis, or spool while it is down)",
                            ["kind", "destination"])
EVENT_LOG_REPLAYED = Counter("recsvc_event_log_replayed_total", "Spooled records replayed into Redis")

KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# 404s and the like get one label, and odd methods another, so random requests cannot grow the series.
UNMATCHED_ENDPOINT = "unmatched"


_request_series: dict[tuple, tuple] = {}  # (endpoint, method, status) -> its two labelled series


def observe_request(endpoint: str | None, method: str, status: int, seconds: float) -> None:
    """Record one answered request; `endpoint` is the route template (None when no route matched)."""
    method = method if method in KNOWN_METHODS else "OTHER"
    key = (endpoint or UNMATCHED_ENDPOINT, method, status)
    series = _request_series.get(key)
    if series is None:  # labels() costs a lock and a lookup each time: resolve each combination once
        series = _request_series[key] = (REQUEST_SECONDS.labels(key[0], method), RESPONSES.labels(key[0], str(status)))
    series[0].observe(seconds)
    series[1].inc()


_cache_series: dict[bool, Counter] = {}


def observe_cache(hit: bool) -> None:
    series = _cache_series.get(hit)
    if series is None:
        series = _cache_series[hit] = CACHE_LOOKUPS.labels("hit" if hit else "miss")
    series.inc()


def local_cache_size(entries: int, held_bytes: int) -> None:
    LOCAL_CACHE_ENTRIES.set(entries)
    LOCAL_CACHE_BYTES.set(held_bytes)


def redis_breaker(state: str) -> None:
    REDIS_BREAKER.set(BREAKER_STATES[state])


def redis_write_breaker(state: str) -> None:
    REDIS_WRITE_BREAKER.set(BREAKER_STATES[state])


def redis_error(operation: str) -> None:
    REDIS_ERRORS.labels(operation).inc()


def cache_coalesced() -> None:
    CACHE_COALESCED.inc()


def cache_oversize() -> None:
    CACHE_OVERSIZE.inc()


_source_series: dict[str, Counter] = {}


def observe_source(source: str) -> None:
    series = _source_series.get(source)
    if series is None:  # resolved once per source, as in observe_request
        series = _source_series[source] = FALLBACK_SOURCES.labels(source)
    series.inc()


def event_logged(kind: str, destination: str) -> None:
    EVENT_LOG_RECORDS.labels(kind, destination).inc()


def event_log_replayed(records: int) -> None:
    EVENT_LOG_REPLAYED.inc(records)


def model_swapped(previous: str | None, version: str, created_at: float | None) -> None:
    """A new version serves in this process from now on."""
    if previous is not None and previous != version:
        _retire(MODEL_INFO, previous)
    MODEL_LOADS.inc()
    model_serving(version, created_at)


def _retire(info: Gauge, label: str) -> None:
    """Drop the series of a version (of the model, or of the experiment definitions) this process no longer
    serves, so the info gauge does not keep one per version ever loaded. prometheus_client cannot remove a
    labelled series in multiprocess mode: the value stays in this process's mmap file (and would come back with
    the label). There it is set to 0, and exposition() leaves out the info series at 0."""
    if multiprocess_mode():
        info.labels(label).set(0)
    else:
        info.remove(label)


def model_serving(version: str, created_at: float | None) -> None:
    """Publish the served version and its age in this process's metrics."""
    MODEL_INFO.labels(version).set(1)
    if created_at is not None:
        MODEL_CREATED.set(created_at)
        MODEL_AGE.set(max(0.0, time.time() - created_at))


def model_refused() -> None:
    MODEL_LOAD_FAILURES.inc()


def model_tick(created_at: float | None) -> None:
    """Keep the age current; called by the reload watcher and before each scrape."""
    if created_at is not None:
        MODEL_AGE.set(max(0.0, time.time() - created_at))


def experiments_loaded(previous: str | None, digest: str) -> None:
    """New experiment definitions (by the digest of the file) are used in this process from now on."""
    if previous is not None and previous != digest:
        _retire(EXPERIMENTS_INFO, previous)
    EXPERIMENTS_LOADS.inc()
    experiments_serving(digest, refused=False)


def experiments_serving(digest: str | None, refused: bool) -> None:
    """Publish the definitions in use, and whether the file on disk is refused, in this process's metrics."""
    if digest is not None:
        EXPERIMENTS_INFO.labels(digest).set(1)
    EXPERIMENTS_REFUSED.set(1 if refused else 0)


def experiments_refused() -> None:
    EXPERIMENTS_LOAD_FAILURES.inc()
    EXPERIMENTS_REFUSED.set(1)


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def exposition() -> tuple[bytes, str]:
    """(body, content type) of a scrape: every worker's values when running under gunicorn."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        registry.register(_ServedVersionsOnly(multiprocess.MultiProcessCollector(None)))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class _ServedVersionsOnly:
    """Every worker's metrics, less the recsvc_model_info and recsvc_experiments_info series at 0: versions a
    worker served before (see _retire)."""

    def __init__(self, collector):
        self.collector = collector

    def collect(self):
        for metric in self.collector.collect():
            if metric.name in _INFO_NAMES:
                metric.samples = [sample for sample in metric.samples if sample.value != 0]
            yield metric


_INFO_NAMES = frozenset({MODEL_INFO._name, EXPERIMENTS_INFO._name})


def worker_exited(pid: int) -> None:
    """gunicorn child_exit hook: drop the live gauges of a worker that is gone."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)


@contextmanager
def taken_back():
    """Whatever this process records inside is undone on exit. For the master's warm-up before forking
    (recsvc.app.warm_up), which must not show as served requests. Multiprocess mode (the only one it is used in):
    the directory's files are restored byte for byte and new ones removed; no other process writes them yet."""
    directory = os.environ.get(MULTIPROC_ENV)
    saved = {name: _read(os.path.join(directory, name)) for name in os.listdir(directory)} if directory else {}
    try:
        yield
    finally:
        for name in os.listdir(directory) if directory else ():
            path = os.path.join(directory, name)
            if name not in saved:
                os.unlink(path)
                continue
            with open(path, "r+b") as file:  # in place: this process keeps the file mapped
                file.write(saved[name])


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()
