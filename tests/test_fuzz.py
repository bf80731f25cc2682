"""Schemathesis fuzzing of the documented API through WSGI: no 5xx, every answer matches its documented schema."""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from recsvc.app import create_app
from recsvc.config import Settings
from tests.conftest import ADMIN_KEY, API_KEY

# `make test` runs a small budget; `make fuzz` sets RECSVC_FUZZ_EXAMPLES for a longer run.
MAX_EXAMPLES = int(os.environ.get("RECSVC_FUZZ_EXAMPLES", "25"))


def documented_status(ctx, response, case) -> None:
    """Stricter than status_code_conformance, which accepts anything under 'default': the status is listed."""
    documented = case.operation.definition.raw["responses"]
    assert str(response.status_code) in documented, \
        f"{case.method} {case.path} answered {response.status_code}, documented: {sorted(documented)}"


CHECKS = [not_a_server_error, documented_status, status_code_conformance, content_type_conformance,
          response_schema_conformance]
# Valid requests also check that the key is really required (ignored_auth resends without it). Invalid ones are
# not held to negative_data_rejection: unknown query parameters are ignored by design, and schemathesis's
# negated security header would be overridden by the key we send.
CHECKS_BY_MODE = {GenerationMode.POSITIVE: [*CHECKS, ignored_auth], GenerationMode.NEGATIVE: CHECKS}
EXPERIMENT = {"experiments": [{"name": "als-vs-popular", "salt": "fuzz", "status": "running", "control": "control",
                               "variants": [{"name": "control", "strategy": "als", "weight": 50},
                                            {"name": "treatment", "strategy": "popular", "weight": 50}]}]}


@pytest.fixture(scope="module")
def fuzz_app(trained_registry, redis_url, tmp_path_factory):
    """The app with every part switched on: Redis cache and event log, an experiment, admin and agent keys."""
    workdir = tmp_path_factory.mktemp("fuzz")
    experiments = workdir / "experiments.json"
    experiments.write_text(json.dumps(EXPERIMENT))
    app = create_app(Settings(registry=trained_registry, redis_url=redis_url, api_keys=frozenset({API_KEY}),
                              admin_keys=frozenset({ADMIN_KEY}), experiments_path=experiments,
                              spool_dir=workdir / "spool"))
    yield app
    app.extensions["recsvc"].store.stop()
    app.extensions["recsvc"].event_log.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)


def fuzz(operation, mode, examples: int) -> None:
    """Run up to `examples` generated requests against one operation; raises on the first broken check.
    (A hypothesis test per operation rather than schemathesis's pytest plugin, whose fixture-based loader
    does not run under pytest 9.)"""
    key = ADMIN_KEY if operation.path.startswith("/v1/admin/") else API_KEY

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS_BY_MODE[mode])

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_api_answers_as_documented(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, "the OpenAPI document lists every route"
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not has_input(operation):
            continue  # nothing to send wrong
        fuzz(operation, mode, MAX_EXAMPLES)


def has_input(operation) -> bool:
    return bool(operation.definition.raw.get("parameters") or operation.definition.raw.get("requestBody")
                or "{" in operation.path)
