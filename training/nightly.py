"""recsvc-train nightly: ingest -> fit -> evaluate -> gate -> publish -> warm the cache, one run at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recsvc import artifacts
from recsvc.errors import ArtifactError, InvalidInput, RecsvcError
from training.config import TrainConfig
from training.ingest import FileFingerprints, interactions_files
from training.pipeline import FitResult, config_digest, fit_and_publish, sweep_leftovers_step
from training.registry import nightly_lock
from training.runlog import RunLog


@dataclass
class NightlyResult:
    outcome: str  # published, up_to_date or refused
    message: str
    fit: FitResult | None = None
    warm: "WarmOutcome | None" = None  # when a model was published


@dataclass
class WarmOutcome:
    """How the cache warm-up after a publication went: warmed, failed (a warning: the model is published) or
    skipped (no redis_url)."""

    outcome: str
    message: str

    def __str__(self) -> str:
        return self.message if self.outcome == "warmed" else f"{self.outcome}: {self.message}"


def _required(config: TrainConfig, source: Path) -> tuple[list[Path], Path]:
    paths = config.nightly
    missing = [name for name in ("interactions", "registry") if getattr(paths, name) is None]
    if missing:
        raise InvalidInput(f"{source}: the [nightly] section needs {' and '.join(missing)}")
    return paths.interactions, paths.registry


def up_to_date(registry: Path, config: TrainConfig, fingerprints: FileFingerprints) -> str | None:
    """The current version when it was trained on exactly this data (the same files, in the same order, with
    the same bytes; a header-only file adds nothing, see FileFingerprints.input) with exactly this
    configuration. The files hashed are in `fingerprints` for the fit after. A manifest without a digest, or
    with one of an older format, is not up to date: one more training, never an error."""
    current = artifacts.current_version(registry)
    if current is None:
        return None
    try:
        manifest = artifacts.read_manifest(artifacts.versions_root(registry) / current)
    except ArtifactError:
        return None
    paths = config.nightly
    try:
        interactions = interactions_files(paths.interactions)
    except InvalidInput:
        return None  # let ingest report the missing file or the pattern that matches none
    if paths.catalog is not None and not paths.catalog.is_file():
        return None
    digest = config_digest(config, fingerprints.input(interactions),
                           fingerprints.file(paths.catalog) if paths.catalog else None)
    return current if manifest.get("config_digest") == digest else None


def warm_cache_step(registry: Path, redis_url: str | None, top: int, log: RunLog, workers: int = 1) -> WarmOutcome:
    """Precompute suggestions into Redis with training.warm (skipped without a redis_url).

    A failed warm-up does not undo the publication: servers answer from the model and fill the cache.
    """
    if not redis_url:
        return WarmOutcome("skipped", "no redis_url configured")
    from training.warm import warm_cache

    try:
        result = warm_cache(registry, redis_url, top, log=log.info, workers=workers)
    except RecsvcError as exc:
        log.warning(f"cache warm-up failed, the new model serves without it: {exc.message}")
        return WarmOutcome("failed", exc.message)
    return WarmOutcome("warmed", result.summary())


def sweep_recent_items_step(redis_url: str | None, log: RunLog) -> None:
    """Remove customers' expired recent items from Redis (POST /v1/events keeps them in sets without a TTL,
    see recsvc.cache.recent_items_key), every night whatever becomes of the model. A failure is only a
    warning: servers leave expired items out when they read them anyway."""
    if not redis_url:
        return
    import redis

    from recsvc.event_log import sweep_recent_items
    from training.warm import connect

    try:
        customers, removed = sweep_recent_items(connect(redis_url))
    except RecsvcError as exc:
        log.warning(f"removing expired recent items failed: {exc.message}")
    except redis.RedisError as exc:
        log.warning(f"removing expired recent items failed: {exc}")
    else:
        log.info(f"recent items: {removed} expired item(s) removed, {customers} customer(s) with recent items")


def run_nightly(config_path: Path, log: RunLog, force: bool = False) -> NightlyResult:
    """One nightly run; raises InvalidInput for unusable input and training.registry.NightlyBusy when another run
    holds the lock."""
    config = TrainConfig.from_file(config_path)
    interactions, registry = _required(config, config_path)
    with nightly_lock(registry):
        sweep_leftovers_step(registry, log)  # also when nothing is published tonight
        sweep_recent_items_step(config.nightly.redis_url, log)
        fingerprints = FileFingerprints()  # each file hashed once: by the up-to-date check, not again by the fit
        current = None if force else up_to_date(registry, config, fingerprints)
        if current is not None:
            # The outcome line says it (stdout; the summary in JSON): no log line repeating it on stderr.
            return NightlyResult("up_to_date",
                                 f"{current} was trained on the same data and configuration: nothing to do")
        result = fit_and_publish(interactions, registry, config, catalog_path=config.nightly.catalog, log=log,
                                 force=force, fingerprints=fingerprints)
        if not result.published:
            return NightlyResult("refused", f"quality gate refused the new model: {result.gate.reason}", result)
        with log.step("warm_cache"):
            warm = warm_cache_step(registry, config.nightly.redis_url, config.nightly.warm_top, log,
                                   config.nightly.warm_workers)
        result.timings["warm_cache"] = log.seconds["warm_cache"]  # the summary's step times, the warm-up's too
        return NightlyResult("published", f"published {result.version}: {result.gate.reason}", result, warm)
