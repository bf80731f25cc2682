"""Seeded A/B simulations through the Flask app and a real Redis: the report finds a true 30% lift."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from recsvc.experiment_report import srm_p_value
from tests.test_experiments import experiment_settings, start_app, stop_app  # noqa: F401 (fixture)

BATCH = 50  # customers per batch call (the API's maximum)


def serve(client, auth, customers: list[str]) -> list[tuple[str, dict]]:
    """(request_id, result) for each customer, through POST /v1/recommendations/batch."""
    served = []
    for start in range(0, len(customers), BATCH):
        response = client.post("/v1/recommendations/batch", headers=auth, json={
            "requests": [{"customer_id": c, "limit": 3} for c in customers[start : start + BATCH]]})
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        served += [(body["request_id"], result) for result in body["results"]]
    return served


@pytest.mark.slow
def test_twenty_thousand_customers_control_10_treatment_13_percent(experiment_settings, auth):  # noqa: F811
    app = start_app(experiment_settings)
    try:
        client = app.test_client()
        rng = np.random.default_rng(6)
        rates = {"control": 0.10, "treatment": 0.13}
        exposed, accepted = Counter(), Counter()
        for request_id, result in serve(client, auth, [f"sim-{i:05d}" for i in range(20_000)]):
            variant = result["experiment"]["variant"]
            exposed[variant] += 1
            if rng.random() < rates[variant]:
                accepted[variant] += 1
                response = client.post("/v1/feedback", headers=auth, json={
                    "request_id": request_id, "customer_id": result["customer_id"],
                    "item_id": result["items"][0]["item_id"], "action": "accepted", "agent_id": "agent-7"})
                assert response.status_code == 202
        report = client.get("/v1/experiments/als-vs-pop/report", headers=auth).get_json()
    finally:
        stop_app(app)
    rows = {row["name"]: row for row in report["variants"]}
    print("simulation:", {n: (r["customers_exposed"], r["customers_accepted"]) for n, r in rows.items()},
          "p_value", rows["treatment"]["vs_control"]["p_value"], "relative_lift",
          rows["treatment"]["vs_control"]["relative_lift"], "srm_p_value", report["srm_p_value"])
    for name in rates:
        assert rows[name]["customers_exposed"] == exposed[name] and rows[name]["exposures"] == exposed[name]
        assert rows[name]["customers_accepted"] == accepted[name] and rows[name]["accepts"] == accepted[name]
    comparison = rows["treatment"]["vs_control"]
    assert comparison["p_value"] < 0.01 and comparison["significant"] is True
    assert comparison["relative_lift"]["ci_low"] <= 0.30 <= comparison["relative_lift"]["ci_high"]
    assert report["srm_p_value"] > 0.001
    assert report["warnings"] == [] and report["feedback_unmatched"] == 0


def test_two_app_instances_assign_identically_and_the_split_passes_srm(experiment_settings, auth):  # noqa: F811
    customers = [f"twin-{i}" for i in range(2000)]
    variants = []
    for _instance in range(2):
        app = start_app(experiment_settings)
        try:
            variants.append([result["experiment"]["variant"]
                             for _rid, result in serve(app.test_client(), auth, customers)])
        finally:
            stop_app(app)
    assert variants[0] == variants[1]
    split = Counter(variants[0])
    assert srm_p_value([split["control"], split["treatment"]], [50, 50]) > 0.001
