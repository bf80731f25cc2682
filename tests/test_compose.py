"""docker-compose.yml and docs/training.md's cron and Kubernetes examples, checked statically (no Docker here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from recsvc.cli import MALLOC_ENV
from training.cli import main as train_cli
from training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SERVER_SETTINGS_SOURCES = [REPO / "recsvc" / "config.py", REPO / "recsvc" / "gunicorn_conf.py"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source (volume name or host path) of a service's volumes."""
    found = {}
    for spec in service.get("volumes", []):
        spec = spec.removesuffix(":ro").removesuffix(":rw")
        source, _, target = spec.rpartition(":")  # from the right: a source may be ${VAR:-default}
        found[target] = source
    return found


def test_every_recsvc_variable_the_api_sets_is_read_by_the_server(compose):
    sources = "\n".join(path.read_text() for path in SERVER_SETTINGS_SOURCES)
    names = [name for name in compose["services"]["api"]["environment"] if name.startswith("RECSVC_")]
    assert len(names) >= 5
    unknown = [name for name in names if f'"{name}"' not in sources]
    assert unknown == [], f"not read by recsvc/config.py or gunicorn_conf.py: {unknown}"


def test_redis_keeps_accepted_records_it_cannot_evict_the_streams(compose):
    command = compose["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2]))
    assert options["--appendonly"] == "yes" and options["--appendfsync"] in ("always", "everysec")
    assert options["--maxmemory-policy"].startswith("volatile-"), "allkeys-* could evict the event streams"
    assert compose["services"]["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_the_api_points_at_services_and_volumes_that_exist(compose):
    api = compose["services"]["api"]
    assert urlparse(api["environment"]["RECSVC_REDIS_URL"]).hostname in compose["services"]
    volumes = mounts(api)
    assert volumes[api["environment"]["RECSVC_REGISTRY"]] == "registry"
    assert api["environment"]["RECSVC_SPOOL_DIR"].startswith(next(p for p, v in volumes.items() if v == "spool"))
    assert set(volumes.values()) <= set(compose["volumes"])
    assert "/readyz" in api["healthcheck"]["test"][-1]


def test_the_image_creates_the_mounted_directories_for_its_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"mkdir -p /registry /var/lib/recsvc", dockerfile)
    assert re.search(r"chown 10001:10001 /registry /var/lib/recsvc", dockerfile)


def test_the_image_gives_gunicorn_the_malloc_settings_of_recsvc_serve():
    """The image starts gunicorn itself, so it must set what `recsvc serve` would (fewer page faults, less memory)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    for name, value in MALLOC_ENV.items():
        assert re.search(rf"^\s+{name}={value}\b", dockerfile, re.M), name


def test_the_trainer_job_runs_a_real_command_with_the_example_config(compose):
    trainer = compose["services"]["trainer"]
    program, subcommand, *options = trainer["command"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts and subcommand in train_cli.commands
    known = {opt for param in train_cli.commands[subcommand].params for opt in param.opts}
    assert {o for o in options if o.startswith("--")} <= known
    volumes = mounts(trainer)
    config_path = options[options.index("--config") + 1]
    config = TrainConfig.from_file(REPO / volumes[config_path].removeprefix("./"))
    assert str(config.nightly.registry) in volumes and volumes[str(config.nightly.registry)] == "registry"
    assert all(str(path).startswith("/data/") for path in config.nightly.interactions) and "/data" in volumes
    assert urlparse(config.nightly.redis_url).hostname in compose["services"]


def _doc_block(path: Path, language: str) -> str:
    return re.search(rf"^```{language}\n(.*?)^```", path.read_text(), re.M | re.S).group(1)


def _assert_real_trainer_command(program: str, subcommand: str, options: list[str]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert Path(program).name in scripts and subcommand in train_cli.commands
    known = {opt for param in train_cli.commands[subcommand].params for opt in param.opts}
    assert {o for o in options if o.startswith("-")} <= known


def test_the_kubernetes_cronjob_example_uses_real_fields_commands_and_mounts():
    """docs/training.md's CronJob, checked as kubectl's strict validation and the trainer would see it."""
    cronjob = yaml.safe_load(_doc_block(REPO / "docs" / "training.md", "yaml"))
    assert set(cronjob["spec"]) <= {"schedule", "concurrencyPolicy", "startingDeadlineSeconds", "suspend",
                                    "successfulJobsHistoryLimit", "failedJobsHistoryLimit", "timeZone", "jobTemplate"}
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    [container] = job["template"]["spec"]["containers"]
    program, subcommand, *options = container["command"]
    _assert_real_trainer_command(program, subcommand, options)
    config = options[options.index("--config") + 1]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(config).parent) in mounts
    # The documented config is valid, and its paths lie on the CronJob's volumes.
    nightly = TrainConfig.from_dict(tomllib.loads(_doc_block(REPO / "docs" / "training.md", "toml")),
                                    base=Path(config).parent).nightly
    for path in (*nightly.interactions, nightly.catalog, nightly.registry):
        assert any(Path(m) in (path, *path.parents) for m in mounts), path


def test_the_cron_example_runs_a_real_command():
    line = next(row for row in _doc_block(REPO / "docs" / "training.md", "cron").splitlines()
                if not row.startswith("#"))
    words = line.split()
    command = [w for w in words[6:words.index(">>/var/log/recsvc/nightly.jsonl")] if "=" not in w]  # after the user
    program, subcommand, *options = command
    assert program.endswith("/.venv/bin/recsvc-train")  # where `make install` puts it in a checkout
    _assert_real_trainer_command(program, subcommand, options)
