"""recsvc-train: the trainer's command line. Exit codes: 0 done, 1 internal failure, 2 unusable input."""

from __future__ import annotations

import os

# implicit parallelises itself; threaded BLAS underneath it is much slower. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import functools  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from recsvc.errors import InvalidInput, RecsvcError  # noqa: E402

EXIT_UNUSABLE_INPUT = 2


def user_errors(command):
    """Turn a user's mistake into a readable message and a documented exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InvalidInput as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(EXIT_UNUSABLE_INPUT)
        except RecsvcError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(1)

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


@main.command("demo-data")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory to write into.")
@click.option("--customers", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--items", type=click.IntRange(min=8), default=400, show_default=True)
@click.option("--interactions", type=click.IntRange(min=1), default=50_000, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@user_errors
def demo_data(out: Path, customers: int, items: int, interactions: int, seed: int) -> None:
    """Write a synthetic data set: interactions.csv, catalog.csv, customers.csv."""
    from training.demo_data import DemoSizes, write

    paths = write(out, DemoSizes(customers=customers, items=items, interactions=interactions), seed=seed)
    for name, path in paths.items():
        click.echo(f"wrote {path} ({name})")


@main.command()
@click.option("--interactions", "interactions_path", type=click.Path(path_type=Path), required=True,
              help="CSV, CSV.gz or Parquet with customer_id and item_id columns.")
@click.option("--catalog", "catalog_path", type=click.Path(path_type=Path), help="Catalog CSV or Parquet.")
@click.option("--registry", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--strategies", help="Comma list, e.g. als,popular (default: from the config).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Trainer config, TOML or JSON.")
@user_errors
def fit(interactions_path: Path, catalog_path: Path | None, registry: Path, strategies: str | None,
        config_path: Path | None) -> None:
    """Train, evaluate on a holdout and publish a new model version."""
    from training.config import TrainConfig
    from training.pipeline import fit_and_publish

    config = TrainConfig.from_file(config_path)
    if strategies:
        config.strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    result = fit_and_publish(interactions_path, registry, config, catalog_path=catalog_path,
                             log=lambda line: click.echo(line, err=True))
    click.echo(format_table(result.metrics, metric_columns(config.k), marker=result.default_strategy))
    click.echo(f"published {result.version} (default strategy: {result.default_strategy}) "
               f"in {result.timings['total']:.1f}s -> {result.path}")


@main.command()
@click.option("--interactions", "interactions_path", type=click.Path(path_type=Path), required=True,
              help="CSV, CSV.gz or Parquet with customer_id and item_id columns.")
@click.option("--strategy", required=True, help="The strategy to tune, e.g. als or ease.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Parameter sets to try, besides the config's current one.")
@click.option("--metric", default="ndcg@10", show_default=True, help="What to maximise: ndcg, precision, recall, "
              "map or hit_rate, at K.")
@click.option("--search", type=click.Choice(["random", "grid"]), default="random", show_default=True)
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the random search.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Trainer config (TOML or JSON) to read, and to write the best parameters into (created if missing).")
@user_errors
def tune(interactions_path: Path, strategy: str, trials: int, metric: str, search: str, seed: int,
         config_path: Path | None) -> None:
    """Search a strategy's parameters on a validation split carved from the training part (never the test split)."""
    from training.config import TrainConfig
    from training.tune import format_leaderboard, run, write_best

    config = TrainConfig.from_file(config_path if config_path is not None and config_path.exists() else None)
    result = run(interactions_path, strategy, config, trials, metric, search, seed,
                 log=lambda line: click.echo(line, err=True))
    click.echo(format_leaderboard(result))
    if config_path is None:
        click.echo("not saved: pass --config FILE to write the best parameters into a config")
        return
    write_best(config_path, result)
    click.echo(f"wrote the best {strategy} parameters to {config_path}")


@main.command("warm-cache")
@click.option("--registry", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--redis-url", required=True, help="The Redis the servers use, e.g. redis://127.0.0.1:6379/0.")
@click.option("--top", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="How many of the most active customers to precompute.")
@click.option("--ttl", type=float, default=24 * 3600.0, show_default=True,
              help="Seconds the entries live, at most 86400 (until the next nightly model, by default).")
@user_errors
def warm_cache(registry: Path, redis_url: str, top: int, ttl: float) -> None:
    """Precompute the default suggestions of the most active customers into Redis (exit 1: Redis unreachable)."""
    from training.warm import warm_cache as warm

    result = warm(registry, redis_url, top, ttl=ttl, log=lambda line: click.echo(line, err=True))
    click.echo(result.summary())


if __name__ == "__main__":
    main()
