"""recsvc-train experiments: the live report from the Redis event log, and an offline replay of the variants."""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np
import redis
import scipy.sparse as sp

from recsvc.cache import experiments_key
from recsvc.config import checked_redis_url, redacted_url
from recsvc.errors import InvalidInput, RecsvcError
from recsvc.event_log import EXPOSURE, FEEDBACK, READ_TIMEOUT, RedisStreams
from recsvc.experiments import Experiment, load_experiments, parse_published
from training.cli_options import INTERACTIONS_OPTION
from training.runlog import LoggedCommand, RunLog, run_log_options

CHART_SUFFIXES = (".html", ".png")

REDIS_URL = click.option("--redis-url", envvar="RECSVC_REDIS_URL", help="The Redis the servers log into "
                         "(default: $RECSVC_REDIS_URL).")
DEFINITIONS = click.option("--experiments", "experiments_path", type=click.Path(path_type=Path),
                           envvar="RECSVC_EXPERIMENTS", help="Definitions file (default: $RECSVC_EXPERIMENTS, "
                           "else the definitions the servers published to Redis).")


def user_errors(command):
    """training.cli's user_errors, looked up at call time: training.cli imports this module while it loads."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from training.cli import user_errors as readable

        return readable(command)(*args, **kwargs)

    return wrapper


@click.group()
def experiments() -> None:
    """A/B experiments: live report, offline replay."""


@experiments.command("report", cls=LoggedCommand)
@click.argument("name")
@REDIS_URL
@DEFINITIONS
@click.option("--alpha", type=click.FloatRange(0.001, 0.2), default=0.05, show_default=True)
@click.option("--chart", "chart_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a chart of the rates with their intervals: FILE.html (no extra needs) or FILE.png "
                   "(needs matplotlib: pip install 'recsvc[charts]').")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@run_log_options
@user_errors
def report_command(name: str, redis_url: str | None, experiments_path: Path | None, alpha: float,
                   chart_path: Path | None, as_json: bool, log: RunLog) -> None:
    """The statistics of experiment NAME from the event log in Redis (exit 2: unknown experiment or bad option,
    1: Redis unreachable). --log-format json: the report as with --json, on one line."""
    redis_url = require_redis_url(redis_url)
    if chart_path is not None:
        check_chart(chart_path)  # before the report is read and printed: a chart that cannot be written prints nothing
    from recsvc.experiment_report import report_for  # here: scipy.stats costs every recsvc-train start 0.4 s

    client = redis_client(redis_url)
    try:
        experiment = _definition(name, experiments_path, client)
        streams = RedisStreams(client, dedupe_ttl=0)
        report = report_for(experiment, streams.read(EXPOSURE), streams.read(FEEDBACK), alpha)
    except redis.RedisError as exc:
        raise RecsvcError(f"cannot read the event log from {redacted_url(redis_url)}: {exc}") from None
    if as_json or log.log_format == "json":
        click.echo(json.dumps(report, indent=None if log.log_format == "json" else 2))
    else:
        click.echo(format_report(report))
    if chart_path is not None:
        write_chart(report, chart_path)
        log.info(f"wrote {chart_path}", chart=str(chart_path))


def require_redis_url(redis_url: str | None) -> str:
    """The --redis-url (or $RECSVC_REDIS_URL) of a command that reads the event log; InvalidInput (exit 2)
    when neither gives one."""
    if not redis_url:
        raise InvalidInput("pass --redis-url or set RECSVC_REDIS_URL")
    return redis_url


def redis_client(redis_url: str) -> redis.Redis:
    """A client for reading the event log (a whole stream takes longer than one command); ConfigError for a
    malformed URL, named as --redis-url. It connects on first use: a Redis that does not answer is a
    redis.RedisError then."""
    checked_redis_url(redis_url, "--redis-url")
    return redis.Redis.from_url(redis_url, socket_timeout=READ_TIMEOUT, socket_connect_timeout=5)


def _definition(name: str, path: Path | None, client: redis.Redis) -> Experiment:
    """From the file when given, else from the definitions the servers published to Redis."""
    if path is not None:
        definitions = load_experiments(path, label=f"experiments file {path}")
    else:
        definitions = parse_published(client.hgetall(experiments_key()))  # removed ones too: their past data
    experiment = definitions.get(name)
    if experiment is None:
        known = ", ".join(e.name for e in definitions.experiments) or "none"
        raise InvalidInput(f"no experiment named {name!r} (known: {known})")
    return experiment


def _rate(interval: dict, percent: bool = True) -> str:
    if interval["value"] is None:
        return "n/a"
    scale, unit = (100, "%") if percent else (1, "")
    text = f"{interval['value'] * scale:.2f}{unit}"
    if interval["ci_low"] is not None:
        text += f" [{interval['ci_low'] * scale:.2f}, {interval['ci_high'] * scale:.2f}]"
    return text


def format_report(report: dict) -> str:
    """A plain table for a terminal: one row per variant, then the checks and warnings."""
    from recsvc.experiment_report import confidence_label  # not at the top: see report_command

    level = confidence_label(report["alpha"])
    header = ["variant", "strategy", "customers", "exposures", "accepted", "accepts", f"acceptance rate ({level} CI)",
              "accepts/exposure", f"rel. lift ({level} CI)", "p_value"]
    rows = [header]
    for row in report["variants"]:
        versus = row["vs_control"]
        rows.append([row["name"] + (" (control)" if versus is None else ""), row["strategy"],
                     str(row["customers_exposed"]), str(row["exposures"]), str(row["customers_accepted"]),
                     str(row["accepts"]), _rate(row["acceptance_rate"]),
                     _rate(row["accepts_per_exposure"], percent=False),
                     "" if versus is None else _rate(versus["relative_lift"]),
                     "" if versus is None or versus["p_value"] is None else f"{versus['p_value']:.3g}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    srm = report["srm_p_value"]
    lines.append(f"\nexperiment {report['experiment']} ({report['status']}); srm_p_value "
                 f"{'n/a' if srm is None else f'{srm:.3g}'}; feedback not matched to an exposure: "
                 f"{report['feedback_unmatched']}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def check_chart(path: Path) -> None:
    """What writing a chart to `path` needs, checked before the work: a known suffix, a path that can take the
    file and, for .png, matplotlib (.html needs nothing else). InvalidInput, or an OSError, when one is missing."""
    from recsvc.files import check_writable_file

    if path.suffix.lower() not in CHART_SUFFIXES:
        raise InvalidInput(f"--chart must end in {' or '.join(CHART_SUFFIXES)}")
    if path.suffix.lower() == ".png":
        _pyplot()
    check_writable_file(path)


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); InvalidInput when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInput("--chart FILE.png needs matplotlib (pip install 'recsvc[charts]'); or use --chart "
                           "FILE.html") from None
    return plt


def write_chart(report: dict, path: Path) -> None:
    """The customer-level acceptance rate and accepts per exposure of each variant with their intervals (at the
    report's confidence level, 1 - alpha)."""
    if path.suffix.lower() == ".png":
        return _write_png(report, path)
    path.write_text(chart_html(report), encoding="utf-8")


def chart_html(report: dict) -> str:
    """A self-contained HTML page with one SVG panel per metric (no scripts, no downloads)."""
    from recsvc.experiment_report import confidence_label

    level = confidence_label(report["alpha"])
    panels = "".join(_svg_panel(report, metric, title) for metric, title in (
        ("acceptance_rate", f"Customers who accepted a suggestion (share, {level} CI)"),
        ("accepts_per_exposure", f"Accepts per exposure ({level} CI)")))
    title = f"Experiment {report['experiment']}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body style='font-family:sans-serif'><h1>{title}</h1>{panels}"
            f"<p>srm_p_value: {report['srm_p_value']}</p>"
            + "".join(f"<p><b>warning:</b> {html.escape(w)}</p>" for w in report["warnings"]) + "</body></html>")


def _svg_panel(report: dict, metric: str, title: str) -> str:
    rows = [(r["name"], r[metric]) for r in report["variants"]]
    top = max([i["ci_high"] or i["value"] or 0 for _, i in rows] + [1e-9]) * 1.15
    width, left, row_height = 640, 140, 40
    x = lambda v: left + (width - left - 20) * v / top  # noqa: E731
    parts = [f"<h2>{title}</h2><svg width='{width}' height='{row_height * len(rows) + 20}'>"]
    for index, (name, interval) in enumerate(rows):
        y = 20 + index * row_height
        parts.append(f"<text x='0' y='{y + 5}'>{html.escape(name)}</text>")  # a variant name may hold "<"
        if interval["value"] is None:
            continue
        if interval["ci_low"] is not None:
            parts.append(f"<line x1='{x(interval['ci_low']):.1f}' x2='{x(interval['ci_high']):.1f}' y1='{y}' "
                         f"y2='{y}' stroke='#444' stroke-width='2'/>")
        parts.append(f"<circle cx='{x(interval['value']):.1f}' cy='{y}' r='5' fill='#1f77b4'/>"
                     f"<text x='{x(interval['value']) + 8:.1f}' y='{y - 8}' font-size='12'>"
                     f"{interval['value']:.4f}</text>")
    return "".join(parts) + "</svg>"


def _write_png(report: dict, path: Path) -> None:
    plt = _pyplot()
    from recsvc.experiment_report import confidence_label

    figure, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.6 * len(report["variants"])))
    for ax, metric in zip(axes, ("acceptance_rate", "accepts_per_exposure")):
        names = [r["name"] for r in report["variants"]]
        values = [r[metric]["value"] or 0 for r in report["variants"]]
        low = [v - (r[metric]["ci_low"] if r[metric]["ci_low"] is not None else v)
               for v, r in zip(values, report["variants"])]
        high = [(r[metric]["ci_high"] if r[metric]["ci_high"] is not None else v) - v
                for v, r in zip(values, report["variants"])]
        ax.errorbar(values, range(len(names)), xerr=[low, high], fmt="o", capsize=4)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(metric.replace("_", " "))
    figure.suptitle(f"Experiment {report['experiment']} ({confidence_label(report['alpha'])} intervals)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@experiments.command("replay")
@click.argument("name")
@DEFINITIONS
@REDIS_URL
@INTERACTIONS_OPTION
@click.option("--catalog", "catalog_path", type=click.Path(path_type=Path), help="Catalog: inactive items are "
              "never recommended.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Trainer config (holdout, k, "
              "strategy parameters).")
@click.option("--json", "as_json", is_flag=True, help="Print the replay as JSON.")
@user_errors
def replay_command(name: str, experiments_path: Path | None, redis_url: str | None,
                   interactions_files: tuple[Path, ...],
                   catalog_path: Path | None, config_path: Path | None, as_json: bool) -> None:
    """Replay experiment NAME offline: each holdout customer gets the variant the live service would give
    them, and each variant's strategy is evaluated on its own customers, beside the control."""
    from training.config import TrainConfig

    if experiments_path is None and not redis_url:
        raise InvalidInput("pass --experiments FILE (or set RECSVC_EXPERIMENTS), or --redis-url URL (or set "
                           "RECSVC_REDIS_URL) to use the definitions the servers published")
    if experiments_path is not None:
        experiment = _definition(name, experiments_path, client=None)
    else:
        client = redis_client(redis_url)
        try:
            experiment = _definition(name, None, client)
        except redis.RedisError as exc:
            raise RecsvcError(f"cannot read the published experiment definitions from {redacted_url(redis_url)}: "
                              f"{exc}") from None
        finally:
            client.close()
    config = TrainConfig.from_file(config_path)
    result = replay(experiment, interactions_files, config, catalog_path, log=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(result, indent=2) if as_json else format_replay(result, config.k))


def replay(experiment: Experiment, interactions_files: Path | Sequence[Path], config,
           catalog_path: Path | None = None, log=None) -> dict:
    """Offline metrics per variant: the variants' strategies trained on one holdout split, each evaluated on
    the holdout customers the experiment assigns to that variant."""
    from training.evaluate import evaluate
    from training.pipeline import build_strategies, fit_strategies, holdout_split, load_prepared, resolve_strategies
    from training.runlog import RunLog

    log = RunLog.of(log)
    names = sorted({v.strategy for v in experiment.variants})
    resolve_strategies(names)  # an unknown strategy is the user's input error, reported before reading data
    strategies = build_strategies(names, config)
    data = load_prepared(interactions_files, config, catalog_path, log)
    train, test = holdout_split(data, config)
    scorers, _metrics, _params = fit_strategies(data, train, test, strategies, config, log)
    customer_ids = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in data.interactions.customers]
    assigned = np.array([experiment.variant_of(c).name for c in customer_ids])
    inactive = np.flatnonzero(~np.asarray(data.catalog.active, dtype=bool))
    variants = {}
    for variant in experiment.variants:
        members = sp.diags((assigned == variant.name).astype(np.float32))
        own_test = (members @ test).tocsr()
        own_test.eliminate_zeros()
        variants[variant.name] = {"strategy": variant.strategy, **evaluate(
            scorers[variant.strategy], train, own_test, k=config.k, exclude_items=inactive)}
    return {"experiment": experiment.name, "control": experiment.control, "k": config.k,
            "holdout": config.holdout.as_dict(), "variants": variants,
            "expected_relative_lift": _expected_lift(variants, experiment.control, f"hit_rate@{config.k}")}


def _expected_lift(variants: dict, control: str, metric: str) -> dict:
    base = variants[control][metric]
    return {name: (v[metric] / base - 1 if base > 0 else None) for name, v in variants.items() if name != control}


def format_replay(result: dict, k: int) -> str:
    columns = [f"hit_rate@{k}", f"precision@{k}", f"ndcg@{k}", f"recall@{k}"]
    header = ["variant", "strategy", "customers", *columns, f"rel. lift hit_rate@{k}"]
    rows = [header]
    for name, values in result["variants"].items():
        lift = result["expected_relative_lift"].get(name)
        rows.append([name + (" (control)" if name == result["control"] else ""), values["strategy"],
                     str(values["customers"]), *(f"{values[c]:.4f}" for c in columns),
                     "" if lift is None else f"{lift * 100:+.1f}%"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"\nhit_rate@{k} (a holdout customer found at least one of the {k} suggestions) is the offline "
                 "counterpart of the live customer-level acceptance rate")
    return "\n".join(lines)
