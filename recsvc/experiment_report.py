"""Experiment statistics as pure functions: tally exposures and feedback, compare each variant with the control."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from scipy import special  # not scipy.stats: the server would import ~450 more modules for two functions

ACCEPTED = "accepted"
ACTIONS = ("shown", "accepted", "dismissed", "purchased")
MIN_CUSTOMERS = 100  # below this per variant the normal approximations are not trustworthy
MIN_OUTCOMES = 10  # customers who accepted, and who did not, per variant
SRM_THRESHOLD = 0.001

METHODS = {
    "acceptance_rate": "share of exposed customers who accepted at least one suggestion; {level} Wilson score "
                       "interval",
    "absolute_lift": "treatment rate minus control rate; unpooled Wald interval",
    "relative_lift": "treatment rate / control rate - 1; delta-method interval on the log of the ratio (Katz)",
    "p_value": "two-sided two-proportion z-test with pooled variance (equal to Pearson's chi-square, 1 df)",
    "accepts_per_exposure": "accepts / exposures; delta-method variance of a ratio of per-customer sums, so "
                            "repeat exposures of one customer are not treated as independent",
    "srm_p_value": "chi-square goodness of fit of exposed customers per variant against the weights",
}


@dataclass
class VariantCounts:
    """Sufficient statistics of one variant; the sums of squares are over customers."""

    customers: int = 0
    exposures: int = 0
    customers_accepted: int = 0
    accepts: int = 0
    sum_accepts_sq: int = 0
    sum_exposures_sq: int = 0
    sum_accepts_exposures: int = 0
    actions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))


@dataclass
class Tally:
    variants: dict[str, VariantCounts]
    feedback_unmatched: int = 0  # kept in the log but not counted: no exposure has its request_id and customer
    duplicates: int = 0  # records seen twice (a replay or retry), counted once
    customers_in_several_variants: int = 0


def tally(experiment: str, variant_names: Iterable[str], exposures: Iterable[dict],
          feedback: Iterable[dict]) -> Tally:
    """Count one experiment's exposures and the feedback joined to them by (request_id, customer_id).

    `exposures` are those of every experiment: feedback that matches none of them is `feedback_unmatched`.
    A customer counts in the variant of their first exposure.
    """
    result = Tally({name: VariantCounts() for name in variant_names})
    exposed: dict[tuple[str, str], str | None] = {}  # (request_id, customer) -> variant here, None elsewhere
    customer_variant: dict[str, str] = {}
    per_customer: dict[str, list] = {}
    for record in exposures:
        key = (record["request_id"], record["customer_id"])
        if key in exposed:
            result.duplicates += 1
            continue
        here = record["experiment"] == experiment and record["variant"] in result.variants
        exposed[key] = record["variant"] if here else None
        if here:
            _count_exposure(result, customer_variant, per_customer, record)
    seen: set[tuple[str, str, str, str]] = set()
    for record in feedback:
        key = (record["request_id"], record["customer_id"], record["item_id"], record["action"])
        if key in seen:
            result.duplicates += 1
            continue
        seen.add(key)
        join = (record["request_id"], record["customer_id"])
        if join not in exposed:
            result.feedback_unmatched += 1
        elif exposed[join] is not None:
            variant = result.variants[customer_variant[record["customer_id"]]]
            variant.actions[record["action"]] = variant.actions.get(record["action"], 0) + 1
            if record["action"] == ACCEPTED:
                per_customer[record["customer_id"]][1] += 1
    _close(result, customer_variant, per_customer)
    return result


def _count_exposure(result: Tally, customer_variant: dict, per_customer: dict, record: dict) -> None:
    customer = record["customer_id"]
    first = customer_variant.setdefault(customer, record["variant"])
    counts = per_customer.setdefault(customer, [0, 0, False])  # exposures, accepts, seen in another variant
    counts[0] += 1
    counts[2] |= first != record["variant"]


def _close(result: Tally, customer_variant: dict[str, str], per_customer: dict[str, list]) -> None:
    for customer, (exposures, accepts, mixed) in per_customer.items():
        result.customers_in_several_variants += mixed
        counts = result.variants[customer_variant[customer]]
        counts.customers += 1
        counts.exposures += exposures
        counts.accepts += accepts
        counts.customers_accepted += accepts > 0
        counts.sum_accepts_sq += accepts * accepts
        counts.sum_exposures_sq += exposures * exposures
        counts.sum_accepts_exposures += accepts * exposures


def confidence_label(alpha: float) -> str:
    """The intervals' confidence level as people write it: "95%" for alpha 0.05, "99.9%" for 0.001."""
    return f"{round((1 - alpha) * 100, 6):g}%"


def _z(confidence: float) -> float:
    return float(special.ndtri(0.5 + confidence / 2))  # the standard normal quantile


def interval(value: float | None, low: float | None, high: float | None) -> dict:
    return {"value": value, "ci_low": low, "ci_high": high}


def wilson(successes: int, n: int, confidence: float = 0.95) -> dict:
    """A rate with its Wilson score interval; all None when n is 0."""
    if n == 0:
        return interval(None, None, None)
    z, p = _z(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The bounds are exactly 0 with no successes and 1 with no failures; rounding left e.g. 5.6e-17 for 0 of 7.
    return interval(p, 0.0 if successes == 0 else max(0.0, centre - half),
                    1.0 if successes == n else min(1.0, centre + half))


def compare_proportions(x_t: int, n_t: int, x_c: int, n_c: int, confidence: float = 0.95) -> dict:
    """Treatment against control: absolute and relative lift with intervals, and the two-sided p-value."""
    if n_t == 0 or n_c == 0:
        return {"absolute_lift": interval(None, None, None), "relative_lift": interval(None, None, None),
                "p_value": None}
    z, p_t, p_c = _z(confidence), x_t / n_t, x_c / n_c
    diff = p_t - p_c
    se = math.sqrt(p_t * (1 - p_t) / n_t + p_c * (1 - p_c) / n_c)
    pooled = (x_t + x_c) / (n_t + n_c)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n_t + 1 / n_c))
    p_value = float(2 * special.ndtr(-abs(diff) / se_pooled)) if se_pooled > 0 else 1.0
    return {"absolute_lift": interval(diff, diff - z * se, diff + z * se),
            "relative_lift": _relative(p_t, p_c, math.sqrt(_rel_var(p_t, n_t) + _rel_var(p_c, n_c)), z),
            "p_value": p_value}


def _rel_var(p: float, n: int) -> float:
    """Variance of log(p-hat) by the delta method."""
    return (1 - p) / (n * p) if p > 0 else math.inf


def _relative(treatment: float, control: float, se_log: float, z: float) -> dict:
    if control <= 0 or treatment <= 0 or not math.isfinite(se_log):
        return interval(treatment / control - 1 if control > 0 else None, None, None)
    log_ratio = math.log(treatment / control)
    return interval(treatment / control - 1, math.exp(log_ratio - z * se_log) - 1, math.exp(log_ratio + z * se_log) - 1)


def ratio(counts: VariantCounts) -> tuple[float | None, float | None]:
    """(accepts per exposure, its delta-method variance) from per-customer sums; None without exposures."""
    n, exposures = counts.customers, counts.exposures
    if n == 0 or exposures == 0:
        return None, None
    r = counts.accepts / exposures
    if n < 2:
        return r, None
    mean_a, mean_e = counts.accepts / n, exposures / n
    var_a = (counts.sum_accepts_sq - n * mean_a * mean_a) / (n - 1)
    var_e = (counts.sum_exposures_sq - n * mean_e * mean_e) / (n - 1)
    cov = (counts.sum_accepts_exposures - n * mean_a * mean_e) / (n - 1)
    return r, max(0.0, (var_a - 2 * r * cov + r * r * var_e) / (n * mean_e * mean_e))


def compare_ratios(treatment: VariantCounts, control: VariantCounts, confidence: float = 0.95) -> dict:
    """Accepts per exposure, treatment against control: lifts with delta-method intervals and a z-test."""
    (r_t, v_t), (r_c, v_c) = ratio(treatment), ratio(control)
    if r_t is None or r_c is None or v_t is None or v_c is None:
        return {"absolute_lift": interval(None, None, None), "relative_lift": interval(None, None, None),
                "p_value": None}
    z, diff, se = _z(confidence), r_t - r_c, math.sqrt(v_t + v_c)
    # No spread in either variant (every customer accepted exactly as often as they were shown, or never): a
    # difference is then certain, as the zero-width interval says; scipy's t-test gives 0 there too.
    p_value = float(2 * special.ndtr(-abs(diff) / se)) if se > 0 else float(diff == 0)
    se_log = math.sqrt(v_t / r_t**2 + v_c / r_c**2) if r_t > 0 and r_c > 0 else math.inf
    return {"absolute_lift": interval(diff, diff - z * se, diff + z * se),
            "relative_lift": _relative(r_t, r_c, se_log, z), "p_value": p_value}


def srm_p_value(observed: list[int], weights: list[int]) -> float | None:
    """Chi-square p-value of observed customers per variant against the weights (zero weights left out)."""
    pairs = [(o, w) for o, w in zip(observed, weights) if w > 0]
    total, weight_sum = sum(o for o, _ in pairs), sum(w for _, w in pairs)
    if total == 0 or len(pairs) < 2:
        return None
    expected = [total * w / weight_sum for _, w in pairs]
    statistic = sum((o - e) ** 2 / e for (o, _), e in zip(pairs, expected))
    return float(special.chdtrc(len(pairs) - 1, statistic))  # the chi-square survival function


def build_report(name: str, control: str, variants: list[tuple[str, str, int]], counts: Tally,
                 alpha: float = 0.05) -> dict:
    """The report: `variants` are (name, strategy, weight) in definition order; `control` names one of them."""
    confidence = 1 - alpha
    base = counts.variants[control]
    rows = [_variant_row(v, s, w, counts.variants[v], None if v == control else base, confidence, alpha)
            for v, s, w in variants]
    srm = srm_p_value([counts.variants[v].customers for v, _, _ in variants], [w for _, _, w in variants])
    return {
        "experiment": name, "control": control, "alpha": alpha,
        "primary_metric": "acceptance_rate",
        "variants": rows,
        "srm_p_value": srm,
        "feedback_unmatched": counts.feedback_unmatched,
        "duplicates_ignored": counts.duplicates,
        "customers_in_several_variants": counts.customers_in_several_variants,
        "warnings": _warnings(counts, variants, srm),
        "methods": {metric: text.replace("{level}", confidence_label(alpha)) for metric, text in METHODS.items()},
    }


def _variant_row(name: str, strategy: str, weight: int, counts: VariantCounts, control: VariantCounts | None,
                 confidence: float, alpha: float) -> dict:
    value, variance = ratio(counts)
    half = _z(confidence) * math.sqrt(variance) if variance is not None else None
    row = {
        "name": name, "strategy": strategy, "weight": weight,
        "customers_exposed": counts.customers, "exposures": counts.exposures,
        "customers_accepted": counts.customers_accepted, "accepts": counts.accepts,
        "actions": dict(counts.actions),
        "acceptance_rate": wilson(counts.customers_accepted, counts.customers, confidence),
        "accepts_per_exposure": interval(value, None if half is None else max(0.0, value - half),
                                         None if half is None else value + half),
        "vs_control": None,
    }
    if control is not None:
        primary = compare_proportions(counts.customers_accepted, counts.customers, control.customers_accepted,
                                      control.customers, confidence)
        significant = primary["p_value"] is not None and primary["p_value"] < alpha
        row["vs_control"] = {**primary, "significant": significant,
                             "accepts_per_exposure": compare_ratios(counts, control, confidence)}
    return row


def _warnings(counts: Tally, variants: list[tuple[str, str, int]], srm: float | None) -> list[str]:
    warnings = []
    if srm is not None and srm < SRM_THRESHOLD:
        warnings.append(f"sample ratio mismatch: srm_p_value {srm:.2g} < {SRM_THRESHOLD}; the split does not match "
                        "the weights, so the comparison is not trustworthy (check that every variant's strategy "
                        "is in the current model and that the definitions did not change)")
    small = [v for v, _, _ in variants if _too_small(counts.variants[v])]
    if small:
        warnings.append(f"samples too small in {', '.join(small)}: fewer than {MIN_CUSTOMERS} customers, or fewer "
                        f"than {MIN_OUTCOMES} who accepted or who did not; intervals and p-values are unreliable")
    if counts.customers_in_several_variants:
        warnings.append(f"{counts.customers_in_several_variants} customers were exposed to several variants "
                        "(definitions changed while running); each counts in their first variant")
    if len(variants) > 2:
        warnings.append("several treatments are compared with the control; p-values are not corrected for "
                        "multiple comparisons")
    return warnings


def _too_small(counts: VariantCounts) -> bool:
    return (counts.customers < MIN_CUSTOMERS or counts.customers_accepted < MIN_OUTCOMES
            or counts.customers - counts.customers_accepted < MIN_OUTCOMES)


def report_for(experiment, exposures: Iterable[dict], feedback: Iterable[dict], alpha: float = 0.05) -> dict:
    """The report of one experiment (a recsvc.experiments.Experiment) over the logged records."""
    variants = [(v.name, v.strategy, v.weight) for v in experiment.variants]
    counts = tally(experiment.name, [v for v, _, _ in variants], exposures, feedback)
    return {**build_report(experiment.name, experiment.control, variants, counts, alpha), "status": experiment.status}
