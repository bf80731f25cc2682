"""recsvc-train: the trainer's command line.

Exit codes: 0 done (published), 1 internal failure, 2 unusable input, 3 refused by the quality gate,
4 another run (fit, nightly or registry rollback) holds the registry's lock, 130 interrupted (SIGINT, Ctrl-C),
143 terminated (SIGTERM).
"""

from __future__ import annotations

import os

# implicit parallelises itself; threaded BLAS underneath it is much slower. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from recsvc.errors import ConfigError, InvalidInput, RecsvcError  # noqa: E402
from training.cli_options import INTERACTIONS_OPTION  # noqa: E402
from training.runlog import LoggedCommand, run_log_options  # noqa: E402

EXIT_UNUSABLE_INPUT = 2
EXIT_REFUSED_BY_GATE = 3
EXIT_BUSY = 4
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a command Ctrl-C stopped


class Terminated(SystemExit):
    """SIGTERM (a stopped container, `kill`, a CronJob's deadline) as an exception: the `finally` and
    `except BaseException` blocks run, so a run stopped while publishing leaves no half-written version."""


def _raise_terminated(signum, _frame) -> None:
    raise Terminated(128 + signum)


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into Terminated while a command runs, and restore the previous handler after it
    (tests invoke commands inside the pytest process)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    click.get_current_context().call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def exit_code_of(exc: Exception) -> int | None:
    """The documented exit code of an error we expect, None for a bug.

    2 when the fix is in what the user gave: a value, a file's content, or a path that cannot be used as
    asked (missing, a file where a directory goes, no permission); 1 when the machine is in trouble (disk
    full, read-only filesystem, I/O error) or a model on disk is damaged; 4 when another run holds the lock.
    """
    from training.registry import NightlyBusy

    if isinstance(exc, (InvalidInput, ConfigError)):  # ConfigError: a RECSVC_* setting or an experiments file
        return EXIT_UNUSABLE_INPUT
    if isinstance(exc, NightlyBusy):
        return EXIT_BUSY
    if isinstance(exc, RecsvcError):
        return 1
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)):
        return EXIT_UNUSABLE_INPUT
    if isinstance(exc, OSError):
        return 1
    return None


def error_message(exc: Exception) -> str:
    if isinstance(exc, RecsvcError):
        return exc.message
    if isinstance(exc, OSError):  # "No space left on device: /srv/registry/versions/..."
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return f"internal error: {exc.__class__.__name__}: {exc}"


def user_errors(command):
    """Turn an error into a readable message and a documented exit code, never a traceback for a user's
    mistake; an interrupt too (130 for SIGINT, 143 for SIGTERM). With --log-format json every error is one JSON
    line on stderr (with `exit_code`, and the error's details as fields: the bad-row counts of a refused input), an
    unexpected one too (the traceback in a field) and an interrupt, so that a cron job's .jsonl log stays JSON."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from training.runlog import RunLog

        log = kwargs.get("log") or RunLog()
        try:
            return command(*args, **kwargs)
        except Terminated as exc:
            log.error("terminated by SIGTERM", exit_code=exc.code)
            raise
        except KeyboardInterrupt:  # SIGINT (Ctrl-C): the `finally` blocks ran as for SIGTERM; not click's "Aborted!"
            log.error("interrupted by SIGINT", exit_code=EXIT_INTERRUPTED)
            sys.exit(EXIT_INTERRUPTED)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own usage errors and exits
        except Exception as exc:
            code = exit_code_of(exc)
            if code is None and log.log_format != "json":
                raise  # a bug: the traceback, exit 1
            fields = {"traceback": traceback.format_exc()} if code is None else getattr(exc, "details", {})
            log.error(error_message(exc), **{**fields, "exit_code": code or 1})
            sys.exit(code or 1)

    return wrapper


def format_table(metrics: dict[str, dict[str, float]], columns: list[str], marker: str | None = None) -> str:
    """A plain aligned table, one row per strategy; `marker` is starred."""
    header = ["strategy", *columns]
    rows = [[f"{name}{' *' if name == marker else ''}", *(f"{values.get(c, float('nan')):.4f}" for c in columns)]
            for name, values in metrics.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def metric_columns(k: int) -> list[str]:
    return [f"{m}@{k}" for m in ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build, evaluate and publish recsvc recommendation models."""
    _exit_cleanly_on_sigterm()


@main.command("demo-data")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory to write into.")
@click.option("--customers", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--items", type=click.IntRange(min=8), default=400, show_default=True)
@click.option("--interactions", type=click.IntRange(min=1), default=50_000, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=7, show_default=True)
@user_errors
def demo_data(out: Path, customers: int, items: int, interactions: int, seed: int) -> None:
    """Write a synthetic data set: interactions.csv, catalog.csv, customers.csv."""
    from training.demo_data import DemoSizes, write

    paths = write(out, DemoSizes(customers=customers, items=items, interactions=interactions), seed=seed)
    for name, path in paths.items():
        click.echo(f"wrote {path} ({name})")


def _strategy_list(strategies: str | None, config) -> None:
    if strategies is not None:
        config.strategies = [s.strip() for s in strategies.split(",") if s.strip()]
        if not config.strategies:
            raise InvalidInput(f"--strategies {strategies!r} names no strategy; give a comma list such as als,ease")


def report_fit(result, config, log, warm: dict | None = None) -> None:
    """The summary at the end of fit and nightly: metrics table, step times, outcome; exit 3 when refused.
    `warm`: nightly's cache warm-up ({"outcome", "message"}), in the JSON summary."""
    if log.log_format == "json":
        click.echo(json.dumps({**fit_summary(result), **({"warm": warm} if warm else {})}, default=str))
    elif not log.quiet:
        click.echo(format_table(result.metrics, metric_columns(config.k), marker=result.default_strategy))
        click.echo("seconds: " + ", ".join(f"{step} {seconds:.1f}" for step, seconds in result.timings.items()))
    if not result.published:
        log.warning(f"refused: the quality gate kept the current model: {result.gate.reason}",
                    gate=result.gate.as_dict())
        sys.exit(EXIT_REFUSED_BY_GATE)
    if log.log_format != "json":
        removed = f"; retention removed {', '.join(result.removed_versions)}" if result.removed_versions else ""
        click.echo(f"published {result.version} (default strategy: {result.default_strategy}; {result.gate.reason}) "
                   f"in {result.timings['total']:.1f}s -> {result.path}{removed}")  # the result: stdout, --quiet too


def fit_summary(result) -> dict:
    return {"event": "summary", "outcome": "published" if result.published else "refused",
            "version": result.version, "published": result.published,
            "default_strategy": result.default_strategy, "gate": result.gate.as_dict(), "metrics": result.metrics,
            "seconds": {step: round(seconds, 3) for step, seconds in result.timings.items()},
            "path": result.path, "removed_versions": result.removed_versions}


@main.command(cls=LoggedCommand)
@INTERACTIONS_OPTION
@click.option("--catalog", "catalog_path", type=click.Path(path_type=Path), help="Catalog CSV or Parquet.")
@click.option("--registry", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--strategies", help="Comma list, e.g. als,popular (default: from the config).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Trainer config, TOML or JSON.")
@click.option("--force", is_flag=True, help="Publish even when the quality gate refuses (first model, emergency).")
@run_log_options
@user_errors
def fit(interactions_files: tuple[Path, ...], catalog_path: Path | None, registry: Path, strategies: str | None,
        config_path: Path | None, force: bool, log) -> None:
    """Train, evaluate on a holdout and, when the quality gate passes, publish a new model version
    (exit 3 when refused)."""
    from recsvc import artifacts
    from recsvc.files import check_writable_directory
    from training.config import TrainConfig
    from training.pipeline import fit_and_publish
    from training.registry import nightly_lock

    config = TrainConfig.from_file(config_path)
    _strategy_list(strategies, config)
    check_writable_directory(registry)  # a path that cannot hold it fails before the training, not after
    artifacts.current_version(registry)  # so does a damaged pointer (the quality gate reads it)
    # The registry's lock, as nightly holds it: a fit and a nightly run would otherwise gate against each other's
    # current version and sweep each other's half-written version as a leftover.
    with nightly_lock(registry):
        result = fit_and_publish(interactions_files, registry, config, catalog_path=catalog_path, log=log, force=force)
    report_fit(result, config, log)


@main.command("evaluate", cls=LoggedCommand)
@INTERACTIONS_OPTION
@click.option("--catalog", "catalog_path", type=click.Path(path_type=Path), help="Catalog: inactive items are "
              "never recommended.")
@click.option("--strategies", help="Comma list (default: from the config); popular is always included.")
@click.option("--k", type=click.IntRange(min=1), help="Cut-off of the metrics (default: from the config, 10).")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the holdout (default: from the config, 42).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Trainer config, TOML or JSON.")
@run_log_options
@user_errors
def evaluate_command(interactions_files: tuple[Path, ...], catalog_path: Path | None, strategies: str | None,
                     k: int | None, seed: int | None, as_json: bool, config_path: Path | None, log) -> None:
    """Compare strategies on the configured holdout, always beside popular; publishes nothing."""
    from training.config import TrainConfig
    from training.pipeline import compare_strategies

    config = TrainConfig.from_file(config_path)
    _strategy_list(strategies, config)
    if k is not None:
        config.k, config.primary_metric = k, f"{config.primary_metric.split('@')[0]}@{k}"
    if seed is not None:
        config.holdout = dataclasses.replace(config.holdout, seed=seed)
    metrics, best = compare_strategies(interactions_files, config, catalog_path=catalog_path, log=log)
    if log.log_format == "json":  # like fit's summary: one JSON line on stdout
        click.echo(json.dumps({"event": "summary", "holdout": config.holdout.as_dict(), "k": config.k, "best": best,
                               "metrics": metrics}))
        return
    if as_json:
        click.echo(json.dumps({"holdout": config.holdout.as_dict(), "k": config.k, "best": best, "metrics": metrics},
                              indent=2))
        return
    click.echo(f"holdout: {json.dumps(config.holdout.as_dict())}; best by {config.primary_metric}: {best} (*)")
    click.echo(format_table(metrics, metric_columns(config.k), marker=best))


@main.command(cls=LoggedCommand)
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="Nightly config (TOML or JSON) with a [nightly] section naming interactions and registry.")
@click.option("--force", is_flag=True, help="Retrain even when up to date, and publish even when the gate refuses.")
@run_log_options
@user_errors
def nightly(config_path: Path, force: bool, log) -> None:
    """Ingest, fit, evaluate, gate, publish and warm the cache; one run per registry at a time.

    Exit codes: 0 published or already up to date, 2 unusable input, 3 refused by the quality gate,
    4 another run (fit, nightly or rollback) holds the registry's lock.
    """
    from training.config import TrainConfig
    from training.nightly import run_nightly

    result = run_nightly(config_path, log, force=force)
    if result.fit is None:
        click.echo(json.dumps({"event": "summary", "outcome": result.outcome, "message": result.message})
                   if log.log_format == "json" else result.message)
        return
    warm = None if result.warm is None else dataclasses.asdict(result.warm)
    if result.warm is not None:
        log.info(f"cache warm-up: {result.warm}", warm=warm)
    report_fit(result.fit, TrainConfig.from_file(config_path), log, warm=warm)


REGISTRY_OPTION = click.option("--registry", type=click.Path(file_okay=False, path_type=Path), required=True,
                               help="The model registry directory.")


@main.group()
def registry() -> None:
    """List, show and roll back model versions."""


@registry.command("list", cls=LoggedCommand)
@REGISTRY_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
@run_log_options
@user_errors
def registry_list(registry: Path, as_json: bool, log) -> None:
    """Every version, oldest first; the current one is starred. --log-format json: the versions as with --json,
    on one line."""
    from training.registry import list_summaries

    summaries = list_summaries(registry)
    if as_json or log.log_format == "json":
        versions = [dataclasses.asdict(s) for s in summaries]
        click.echo(json.dumps(versions, indent=None if log.log_format == "json" else 2))
        return
    if not summaries:
        click.echo(f"{registry}: no versions yet")
        return
    rows = [["", "version", "created_at", "default", "metric", "rows", "customers", "items"]]
    rows += [["*" if s.current else "", s.version, s.created_at, s.default_strategy,
              f"{s.primary_metric} {s.primary_value:.4f}" if s.primary_value is not None else "-",
              str(s.rows), str(s.customers), str(s.items)] for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    click.echo("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows))


@registry.command("show", cls=LoggedCommand)
@REGISTRY_OPTION
@click.argument("version", required=False)
@run_log_options
@user_errors
def registry_show(registry: Path, version: str | None, log) -> None:
    """The manifest of VERSION (default: the current one) as JSON (--log-format json: on one line)."""
    from training.registry import show

    manifest = show(registry, version)
    click.echo(json.dumps(manifest, indent=None if log.log_format == "json" else 2, sort_keys=True))


@registry.command("rollback", cls=LoggedCommand)
@REGISTRY_OPTION
@click.argument("version", required=False)
@run_log_options
@user_errors
def registry_rollback(registry: Path, version: str | None, log) -> None:
    """Make VERSION current (default: the version current before the current one); servers follow within seconds.

    Takes the nightly lock (exit 4 while a nightly run holds it)."""
    from training.registry import rollback

    previous, current = rollback(registry, version)
    if log.log_format == "json":
        click.echo(json.dumps({"event": "summary", "outcome": "unchanged" if previous == current else "rolled_back",
                               "from": previous, "to": current}))
    else:
        click.echo(f"CURRENT: {current} is current already; nothing changed" if previous == current
                   else f"CURRENT: {previous} -> {current}")


@main.command()
@INTERACTIONS_OPTION
@click.option("--catalog", "catalog_path", type=click.Path(path_type=Path),
              help="Catalog, as for fit: its tags column reaches ease's tag_weight.")
@click.option("--strategy", required=True, help="The strategy to tune, e.g. als or ease.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Parameter sets to try, besides the config's current one.")
@click.option("--metric", default="ndcg@10", show_default=True, help="What to maximise: ndcg, precision, recall, "
              "map or hit_rate, at K.")
@click.option("--search", type=click.Choice(["random", "grid"]), default="random", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=42, show_default=True, help="Seed of the random search.")
@click.option("--folds", type=click.IntRange(min=1), help="Validation folds to average over "
              "(default: [tuning] folds of the config, else 1).")
@click.option("--validation-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of each customer's training items a fold validates on "
                   "(default: [tuning] validation_fraction, else the holdout's fraction).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Trainer config (TOML or JSON) to read, and to write the best parameters into (created if missing).")
@user_errors
def tune(interactions_files: tuple[Path, ...], catalog_path: Path | None, strategy: str, trials: int, metric: str,
         search: str, seed: int, folds: int | None, validation_fraction: float | None,
         config_path: Path | None) -> None:
    """Search a strategy's parameters on validation folds carved from the training part (never the test split)."""
    from dataclasses import replace

    from recsvc.files import check_writable_file
    from training.config import TrainConfig
    from training.tune import format_leaderboard, run, write_best

    config = TrainConfig.from_file(config_path if config_path is not None and config_path.exists() else None)
    if config_path is not None:
        check_writable_file(config_path)  # a read-only config fails now, not after the trials
    config = replace(config, tuning=replace(
        config.tuning, folds=folds or config.tuning.folds,
        validation_fraction=validation_fraction or config.tuning.validation_fraction))
    result = run(interactions_files, strategy, config, trials, metric, search, seed,
                 log=lambda line: click.echo(line, err=True), catalog_path=catalog_path)
    click.echo(format_leaderboard(result))
    if config_path is None:
        click.echo("not saved: pass --config FILE to write the best parameters into a config")
        return
    write_best(config_path, result)
    click.echo(f"wrote the best {strategy} parameters to {config_path}")


@main.command("warm-cache", cls=LoggedCommand)
@click.option("--registry", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--redis-url", required=True, help="The Redis the servers use, e.g. redis://127.0.0.1:6379/0.")
@click.option("--top", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="How many of the most active customers to precompute.")
@click.option("--ttl", type=float, default=24 * 3600.0, show_default=True,
              help="Seconds the entries live, at most 86400 (until the next nightly model, by default).")
@click.option("--workers", type=click.IntRange(min=1), default=min(4, os.cpu_count() or 1), show_default="the cores, "
              "at most 4", help="Processes computing lists at once (forked once the model is loaded); the warm-up "
              "is bound by computation.")
@run_log_options
@user_errors
def warm_cache(registry: Path, redis_url: str, top: int, ttl: float, workers: int, log) -> None:
    """Precompute the default suggestions of the most active customers into Redis (exit 1: Redis unreachable)."""
    from training.warm import warm_cache as warm

    result = warm(registry, redis_url, top, ttl=ttl, log=log.info, workers=workers)
    click.echo(json.dumps({"event": "summary", "outcome": "warmed", **result.as_dict()})
               if log.log_format == "json" else result.summary())


def _add_groups() -> None:
    from training.events_cli import events  # their own modules, to keep this one short
    from training.experiments_cli import experiments

    main.add_command(events)
    main.add_command(experiments)


_add_groups()


if __name__ == "__main__":
    main()
