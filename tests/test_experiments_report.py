"""The report's statistics as pure functions: hand-made tallies, references from scipy, and A/A simulations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats
from scipy.stats.contingency import relative_risk

from recsvc.experiment_report import (
    VariantCounts,
    build_report,
    compare_proportions,
    compare_ratios,
    ratio,
    srm_p_value,
    tally,
    wilson,
)
from recsvc.experiments import parse_experiments

VARIANTS = [("control", "als", 50), ("treatment", "popular", 50)]


def exposure(request_id: str, customer: str, variant: str, experiment: str = "exp") -> dict:
    return {"kind": "exposure", "request_id": request_id, "customer_id": customer, "experiment": experiment,
            "variant": variant, "strategy": "als", "time": 1.0}


def feedback(request_id: str, customer: str, item: str, action: str = "accepted") -> dict:
    return {"kind": "feedback", "request_id": request_id, "customer_id": customer, "item_id": item,
            "action": action, "time": 2.0}


def counts(customers: int, accepted: int, exposures: int | None = None) -> VariantCounts:
    """One exposure per customer unless said otherwise; each accepting customer accepted once."""
    exposures = customers if exposures is None else exposures
    return VariantCounts(customers=customers, exposures=exposures, customers_accepted=accepted, accepts=accepted,
                         sum_accepts_sq=accepted, sum_exposures_sq=exposures, sum_accepts_exposures=accepted)


def test_tally_joins_feedback_by_request_and_customer_and_counts_each_thing_once():
    exposures = [exposure("r1", "alice", "control"), exposure("r2", "alice", "control"),
                 exposure("r3", "bob", "treatment"), exposure("r3", "bob", "treatment"),  # a replayed duplicate
                 exposure("r4", "carol", "x", experiment="other")]
    events = [feedback("r1", "alice", "i1"), feedback("r2", "alice", "i2"), feedback("r2", "alice", "i2"),
              feedback("r3", "bob", "i1", "dismissed"), feedback("r9", "dave", "i1"),  # unknown request
              feedback("r3", "eve", "i1"),  # a request id with someone else's customer
              feedback("r4", "carol", "i1")]  # another experiment: neither counted nor unmatched
    result = tally("exp", ["control", "treatment"], exposures, events)
    control, treatment = result.variants["control"], result.variants["treatment"]
    assert (control.customers, control.exposures, control.customers_accepted, control.accepts) == (1, 2, 1, 2)
    assert (treatment.customers, treatment.exposures, treatment.customers_accepted, treatment.accepts) == (1, 1, 0, 0)
    assert treatment.actions["dismissed"] == 1
    assert (control.sum_accepts_sq, control.sum_exposures_sq, control.sum_accepts_exposures) == (4, 4, 4)
    assert result.feedback_unmatched == 2
    assert result.duplicates == 2


def test_a_customer_seen_in_two_variants_counts_in_the_first_and_is_reported():
    result = tally("exp", ["control", "treatment"],
                   [exposure("r1", "alice", "control"), exposure("r2", "alice", "treatment")], [])
    assert result.variants["control"].customers == 1 and result.variants["treatment"].customers == 0
    assert result.customers_in_several_variants == 1
    report = build_report("exp", "control", VARIANTS, result)
    assert any("several variants" in w for w in report["warnings"])


def test_wilson_interval_matches_known_values():
    assert wilson(0, 10)["ci_high"] == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    five = wilson(5, 10)
    assert (five["ci_low"], five["ci_high"]) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 0) == {"value": None, "ci_low": None, "ci_high": None}


@pytest.mark.parametrize("successes, n", [(0, 7), (0, 500), (7, 7), (500, 500), (1, 3), (130, 1000)])
def test_wilson_interval_matches_scipy_also_at_none_and_all(successes, n):
    reference = stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
    result = wilson(successes, n)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((reference.low, reference.high), rel=1e-12,
                                                                  abs=1e-300)


def test_proportion_comparison_matches_scipy_references():
    result = compare_proportions(130, 1000, 100, 1000)
    table = [[130, 870], [100, 900]]
    assert result["p_value"] == pytest.approx(stats.chi2_contingency(table, correction=False).pvalue, rel=1e-9)
    katz = relative_risk(130, 1000, 100, 1000).confidence_interval(0.95)
    assert result["relative_lift"]["value"] == pytest.approx(0.3)
    assert (result["relative_lift"]["ci_low"], result["relative_lift"]["ci_high"]) == pytest.approx(
        (katz.low - 1, katz.high - 1), rel=1e-9)
    se = np.sqrt(0.13 * 0.87 / 1000 + 0.1 * 0.9 / 1000)
    assert result["absolute_lift"]["ci_low"] == pytest.approx(0.03 - 1.959964 * se, rel=1e-6)


def test_degenerate_comparisons_give_nones_not_errors():
    none_accepted = compare_proportions(0, 50, 0, 50)
    assert none_accepted["p_value"] == 1.0 and none_accepted["relative_lift"]["value"] is None
    assert compare_proportions(3, 0, 1, 10)["p_value"] is None


def test_accepts_per_exposure_without_spread_agrees_with_its_interval():
    # Every treatment customer accepted the one list shown, no control customer did: no variance in either.
    everyone, nobody = counts(200, 200), counts(200, 0)
    versus = compare_ratios(everyone, nobody)
    assert versus["absolute_lift"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    with warnings.catch_warnings():  # scipy warns that identical values lose precision
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = stats.ttest_ind(np.ones(200), np.zeros(200)).pvalue  # an infinite statistic: 0
    assert versus["p_value"] == pytest.approx(reference) == 0.0
    assert compare_ratios(everyone, everyone)["p_value"] == 1.0


def test_accepts_per_exposure_variance_reduces_to_the_binomial_for_single_exposures():
    value, variance = ratio(counts(1000, 100))
    assert value == 0.1
    assert variance == pytest.approx(0.1 * 0.9 / 999, rel=1e-9)  # sample variance (n-1) over n


def test_srm_p_value_is_a_chi_square_against_the_weights():
    assert srm_p_value([5000, 5000], [50, 50]) == pytest.approx(1.0)
    assert srm_p_value([300, 700], [30, 70]) == pytest.approx(1.0)
    assert srm_p_value([5200, 4800], [1, 1]) == pytest.approx(stats.chisquare([5200, 4800]).pvalue)
    assert srm_p_value([0, 0], [1, 1]) is None


def test_report_warns_on_sample_ratio_mismatch_and_small_samples():
    mismatched = tally("exp", ["control", "treatment"], [], [])
    mismatched.variants.update(control=counts(6000, 600), treatment=counts(4000, 400))
    report = build_report("exp", "control", VARIANTS, mismatched)
    assert report["srm_p_value"] < 0.001
    assert any(w.startswith("sample ratio mismatch") for w in report["warnings"])
    small = tally("exp", ["control", "treatment"], [], [])
    small.variants.update(control=counts(40, 4), treatment=counts(40, 9))
    report = build_report("exp", "control", VARIANTS, small)
    assert any(w.startswith("samples too small") for w in report["warnings"])
    assert not any(w.startswith("sample ratio mismatch") for w in report["warnings"])


def test_report_shape_for_a_clear_winner():
    clear = tally("exp", ["control", "treatment"], [], [])
    clear.variants.update(control=counts(10_000, 1000), treatment=counts(10_000, 1300))
    report = build_report("exp", "control", VARIANTS, clear)
    control, treatment = report["variants"]
    assert control["vs_control"] is None
    assert treatment["vs_control"]["significant"] is True
    assert treatment["vs_control"]["p_value"] < 1e-6
    assert treatment["acceptance_rate"]["value"] == 0.13
    assert report["warnings"] == []


def _simulated_counts(customers: np.ndarray, in_treatment: np.ndarray, rate: float,
                      rng: np.random.Generator) -> dict[str, VariantCounts]:
    """Counts of customers with 1 + Poisson(0.5) exposures, each accepted with probability `rate`."""
    exposures = 1 + rng.poisson(0.5, len(customers))
    accepts = rng.binomial(exposures, rate)
    result = {}
    for name, members in (("control", ~in_treatment), ("treatment", in_treatment)):
        a, e = accepts[members], exposures[members]
        result[name] = VariantCounts(customers=int(members.sum()), exposures=int(e.sum()),
                                     customers_accepted=int((a > 0).sum()), accepts=int(a.sum()),
                                     sum_accepts_sq=int((a * a).sum()), sum_exposures_sq=int((e * e).sum()),
                                     sum_accepts_exposures=int((a * e).sum()))
    return result


def test_aa_simulations_keep_false_positives_near_alpha():
    """300 A/A experiments (fresh salt each, real hash assignment): at alpha 0.05 the share called significant
    must lie in [2%, 8%], for the primary metric, accepts per exposure and the sample-ratio check."""
    rng = np.random.default_rng(20261123)
    ids = [f"customer-{i}" for i in range(4000)]
    primary = ratio_metric = srm = 0
    for simulation in range(300):
        definitions = {"experiments": [{"name": "aa", "salt": f"aa-{simulation}", "status": "running",
                                        "control": "control",
                                        "variants": [{"name": "control", "strategy": "als", "weight": 50},
                                                     {"name": "treatment", "strategy": "als", "weight": 50}]}]}
        experiment = parse_experiments(definitions).get("aa")
        in_treatment = np.array([experiment.variant_of(c).name == "treatment" for c in ids])
        result = tally("aa", ["control", "treatment"], [], [])
        result.variants.update(_simulated_counts(np.arange(len(ids)), in_treatment, 0.10, rng))
        report = build_report("aa", "control", VARIANTS, result)
        comparison = report["variants"][1]["vs_control"]
        primary += comparison["p_value"] < 0.05
        ratio_metric += comparison["accepts_per_exposure"]["p_value"] < 0.05
        srm += report["srm_p_value"] < 0.05
    for name, hits in (("acceptance rate", primary), ("accepts per exposure", ratio_metric), ("srm", srm)):
        assert 0.02 <= hits / 300 <= 0.08, f"{name}: false-positive rate {hits / 300:.3f}"
