"""A/B experiments: their definitions and their live report."""

from __future__ import annotations

import datetime as dt

import marshmallow as ma
from flask import current_app

from recsvc.api.parsing import Blueprint
from recsvc.errors import NotFound
from recsvc.event_log import EXPOSURE, FEEDBACK
from recsvc.experiment_report import report_for
from recsvc.experiments import EXPERIMENT_NAME, describe

blp = Blueprint("experiments", __name__, url_prefix="/v1", description="A/B experiments between strategies")


class ExperimentVariantSchema(ma.Schema):
    name = ma.fields.String(required=True)
    strategy = ma.fields.String(required=True)
    weight = ma.fields.Integer(required=True)


class ExperimentDefinitionSchema(ma.Schema):
    name = ma.fields.String(required=True)
    salt = ma.fields.String(required=True)
    status = ma.fields.String(required=True, metadata={"description": "running or stopped"})
    control = ma.fields.String(required=True)
    variants = ma.fields.List(ma.fields.Nested(ExperimentVariantSchema), required=True)
    start = ma.fields.String(allow_none=True)
    end = ma.fields.String(allow_none=True)
    serving = ma.fields.Boolean(required=True, metadata={
        "description": "customers are assigned now: the first running experiment inside its window"})
    missing_strategies = ma.fields.List(ma.fields.String(), allow_none=True, metadata={
        "description": "variant strategies the current model lacks (their customers are not counted)"})


class ExperimentListSchema(ma.Schema):
    experiments = ma.fields.List(ma.fields.Nested(ExperimentDefinitionSchema), required=True)


class ExperimentReportSchema(ma.Schema):
    experiment = ma.fields.String(required=True)
    status = ma.fields.String(required=True)
    control = ma.fields.String(required=True)
    alpha = ma.fields.Float(required=True)
    primary_metric = ma.fields.String(required=True)
    variants = ma.fields.List(ma.fields.Dict(), required=True, metadata={
        "description": "per variant: customers_exposed, exposures, customers_accepted, accepts, actions, "
                       "acceptance_rate and accepts_per_exposure with 95% intervals, vs_control (lifts, p_value)"})
    srm_p_value = ma.fields.Float(allow_none=True, required=True)
    feedback_unmatched = ma.fields.Integer(required=True, metadata={
        "description": "feedback kept but not counted: no exposure has its request_id and customer"})
    duplicates_ignored = ma.fields.Integer(required=True)
    customers_in_several_variants = ma.fields.Integer(required=True)
    warnings = ma.fields.List(ma.fields.String(), required=True)
    methods = ma.fields.Dict(required=True)


@blp.route("/experiments")
@blp.response(200, ExperimentListSchema)
def list_experiments():
    """The experiment definitions this worker runs with (RECSVC_EXPERIMENTS, as last read: a changed file is
    re-read within the reload interval)."""
    service = current_app.extensions["recsvc"]
    bundle = service.store.current()
    definitions = service.experiments.experiments  # once: a reload may swap them meanwhile
    serving = definitions.active(dt.datetime.now(dt.timezone.utc))
    rows = []
    for experiment in definitions.experiments:
        missing = None if bundle is None else \
            sorted({v.strategy for v in experiment.variants} - set(bundle.scorers))
        rows.append({**describe(experiment), "serving": experiment is serving, "missing_strategies": missing})
    return {"experiments": rows}


@blp.route("/experiments/<name>/report", parameters=[{"in": "path", "name": "name", "description": "The experiment",
                                                      "schema": {"type": "string", "pattern": f"^{EXPERIMENT_NAME}$"}}])
@blp.response(200, ExperimentReportSchema)
@blp.alt_response(404, description="No experiment of that name")
def experiment_report(name: str):
    """Per variant: exposure and acceptance counts, the customer-level acceptance rate and accepts per exposure
    with 95% intervals; against the control: lifts with intervals and p-values; the sample-ratio check.
    Reads the whole event log: meant for people and dashboards, not for the request path."""
    service = current_app.extensions["recsvc"]
    experiment = service.experiments.experiments.get(name)
    if experiment is None:
        raise NotFound(f"no experiment named {name!r}", details={"experiment": name})
    return report_for(experiment, service.event_log.read(EXPOSURE), service.event_log.read(FEEDBACK))
