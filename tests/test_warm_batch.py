"""The batched warm-up against the server, for every kind of scorer a model can default to; the shared ranking."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from recsvc import artifacts
from recsvc.app import create_app
from recsvc.cache import KEY_PREFIX, decode_entry, generation_key
from recsvc.ranking import personal_top, reported
from recsvc.recommend import RecommendationQuery, Recommender
from recsvc.scoring import BlendScorer, FactorScorer, ItemSimilarityScorer, PopularityScorer, fixed_sum
from tests.test_api_fallback import tiny_bundle
from training import warm
from training.config import TrainConfig
from training.pipeline import fit_and_publish
from training.warm import CacheUnavailable, StateReader, most_active, warm_cache
from training.warm_batch import BatchRecommender, strongest

# One default strategy per scorer kind: factors, item similarity (sparse, dense), blend, popularity.
KINDS = {"als": "factors", "item_knn": "sparse", "ease": "dense", "ease_als": "blend", "popular": "popularity"}


@pytest.fixture(scope="session")
def kinds_registry(tmp_path_factory, demo_paths):
    """A version trained with a strategy of every kind; versions differing in their default are made from it."""
    registry = tmp_path_factory.mktemp("kinds")
    # item_knn with 3 neighbours: most lists are topped up by popularity, some are not, a few are all popular.
    # trending is the chain's last step: "Popular this week", or all-time for items no one took that week.
    config = TrainConfig(strategies=[*KINDS, "trending"],
                         params={"als": {"factors": 16, "iterations": 8}, "item_knn": {"neighbours": 3},
                                 "ease_als": {"als_factors": 16, "als_iterations": 8}})
    fit_and_publish(demo_paths["interactions"], registry, config, catalog_path=demo_paths["catalog"],
                    log=lambda _line: None)
    return registry


def with_default(registry, strategy: str):
    """Make a version whose default is `strategy` the current one."""
    bundle = artifacts.load_current(registry)
    version = f"{bundle.manifest['version'].split('-')[0]}-{strategy.replace('_', '')}"
    if version not in artifacts.list_versions(registry):
        bundle.manifest = dict(bundle.manifest, version=version, default_strategy=strategy)
        artifacts.write_version(registry, bundle)
    artifacts.set_current(registry, version)
    return artifacts.load_current(registry)


def test_the_kinds_are_what_they_claim(kinds_registry):
    bundle = artifacts.load_current(kinds_registry)
    assert isinstance(bundle.scorers["als"], FactorScorer)
    assert isinstance(bundle.scorers["item_knn"], ItemSimilarityScorer) and not bundle.scorers["item_knn"].dense
    assert isinstance(bundle.scorers["ease"], ItemSimilarityScorer) and bundle.scorers["ease"].dense
    assert isinstance(bundle.scorers["ease_als"], BlendScorer)
    assert not bundle.scorers["popular"].personal


@pytest.mark.parametrize("strategy, workers", [*((s, 1) for s in KINDS), ("als", 2)])
def test_every_warmed_entry_is_what_the_server_caches(kinds_registry, settings, redis_url, redis_client, auth,
                                                      strategy, workers):
    """All customers (so also those with few items, topped up by popularity), some with items from
    POST /v1/events and one invalidated, warmed and then served: the bytes must be the same."""
    bundle = with_default(kinds_registry, strategy)
    # A generous timeout: on a busy machine a 50 ms one leaves an event in one worker's memory only, which
    # no warm-up (nor another worker) can see.
    app = create_app(dataclasses.replace(settings, registry=kinds_registry, redis_url=redis_url, redis_timeout=2.0))
    try:
        service, client = app.extensions["recsvc"], app.test_client()
        customers = [bundle.customers.external(int(c)) for c in most_active(bundle, len(bundle.customers))]
        bought = {}  # POST /v1/events: the customer's best suggestion, and an item the model does not know
        for customer in customers[::7]:
            bought[customer] = service.recommender.compute(bundle, strategy, RecommendationQuery(customer))["items"][0]
            events = [{"customer_id": customer, "item_id": item, "event_type": "purchase"}
                      for item in (bought[customer]["item_id"], "no-such-item")]
            assert client.post("/v1/events", headers=auth, json=events).status_code == 202
        service.cache.invalidate_customer(customers[3])

        result = warm_cache(kinds_registry, redis_url, top=len(customers), log=lambda _line: None, workers=workers)
        warmed = dict(zip(keys := redis_client.keys(f"{KEY_PREFIX}:rec:*"), redis_client.mget(keys)))
        assert result.entries == len(warmed) == len(customers)

        redis_client.delete(*warmed)
        for customer in customers:
            assert client.get(f"/v1/customers/{customer}/recommendations", headers=auth).status_code == 200
        served = dict(zip(keys := redis_client.keys(f"{KEY_PREFIX}:rec:*"), redis_client.mget(keys)))
        assert served == warmed
    finally:
        service.store.stop()
    # The comparison covered what it should: events, an invalidated customer, top-ups, both sources.
    bodies = {body["customer_id"]: body for body in (orjson.loads(decode_entry(raw)[1]) for raw in warmed.values())}
    # Each list is tagged with its customer's token, which exists in Redis (an evicted token hides the list).
    tokens = dict(zip(customers, redis_client.mget([generation_key(customer) for customer in customers])))
    assert all(tag and tag == tokens[orjson.loads(fragment)["customer_id"]]
               for tag, fragment in map(decode_entry, warmed.values()))
    assert all(best["item_id"] not in {item["item_id"] for item in bodies[customer]["items"]}
               for customer, best in bought.items())
    bodies = list(bodies.values())
    reasons = [reason for body in bodies for item in body["items"] for reason in item["reasons"]]
    if strategy == "item_knn":  # lists short of positive scores (ALS and EASE rarely have any)
        assert "Popular this week" in reasons
    if strategy == "popular":
        assert set(reasons) == {"Popular with customers"}
    if strategy != "popular":
        assert any(reason.startswith("Because the customer has") for reason in reasons)
        assert {body["source"] for body in bodies} >= {"personal"}
    inactive = {bundle.items.external(int(p)) for p in np.flatnonzero(~np.asarray(bundle.catalog.active, bool))}
    assert inactive and not inactive & {item["item_id"] for body in bodies for item in body["items"]}


def test_a_redis_refusing_writes_fails_the_warm_up_with_its_message(trained_registry, own_redis):
    with own_redis.client() as client:
        client.config_set("maxmemory", 1)  # with the default noeviction policy, every SET is refused: OOM
    with pytest.raises(CacheUnavailable, match="OOM"):
        warm_cache(trained_registry, own_redis.url, top=50, log=lambda _line: None)


def test_a_token_made_while_the_warm_up_computes_wins_and_hides_the_warmed_list(trained_registry, redis_url,
                                                                               redis_client, monkeypatch):
    """The warm-up read no token for these customers, then an event made one (as POST /v1/events does after
    adding the items): the warm-up's SET NX leaves that token, and the list it computed is never served."""
    raced = {}
    receive = StateReader.receive

    def receive_then_an_event_arrives(self):
        generations, recent = receive(self)
        customer = self.customer_ids[0].decode()  # the batch's ids, as its keys hold them
        raced[customer] = b"made-by-an-event"
        redis_client.set(generation_key(customer), raced[customer], px=60_000)
        return generations, recent

    monkeypatch.setattr(StateReader, "receive", receive_then_an_event_arrives)
    monkeypatch.setattr(warm, "BATCH", 200)
    result = warm_cache(trained_registry, redis_url, top=500, log=lambda _line: None)  # three batches
    warmed = dict(zip(keys := redis_client.keys(f"{KEY_PREFIX}:rec:*"), redis_client.mget(keys)))
    assert result.entries == len(warmed) == 500 and len(raced) == 3
    tags = {orjson.loads(fragment)["customer_id"]: tag for tag, fragment in map(decode_entry, warmed.values())}
    tokens = dict(zip(tags, redis_client.mget([generation_key(customer) for customer in tags])))
    assert all(tokens[customer] == raced[customer] != tags[customer] for customer in raced)  # a miss
    assert all(tag == tokens[customer] for customer, tag in tags.items() if customer not in raced)


def random_factors(seed: int, customers: int = 300, items: int = 500, factors: int = 24) -> FactorScorer:
    """Random factors with exact ties (duplicated items) and near-ties (items one float32 step apart)."""
    rng = np.random.default_rng(seed)
    item_factors = rng.standard_normal((items, factors)).astype(np.float32)
    item_factors[1::50] = item_factors[::50]
    item_factors[2::50] = np.nextafter(item_factors[::50], np.float32(np.inf))
    return FactorScorer(rng.standard_normal((customers, factors)).astype(np.float32), item_factors)


def test_items_quiet_in_the_trending_window_are_warmed_with_the_servers_reason():
    """A hand-made model whose trending step has an item no one took in the window (below one: all-time
    popularity only): the warmed lists, topped up or all popular, are the server's to the byte."""
    bundle = tiny_bundle()
    bundle.scorers["popular"] = PopularityScorer(np.asarray([1, 2, 3, 0.5, 5, 6, 100], dtype=np.float32),
                                                 window_days=7)
    lists = BatchRecommender(bundle, "als").encode(np.arange(2), ["c0", "c1"], NoRecentItems())
    server = Recommender(store=None, cache=None, cache_ttl=0)
    for row, customer in enumerate(["c0", "c1"]):
        body = orjson.dumps(server.build_body(bundle, "als", RecommendationQuery(customer)))
        assert lists.fragments()[row] == body
        items = orjson.loads(body)["items"]
        assert items[-1]["item_id"] == "i3" and items[-1]["reasons"] == ["Popular with customers"]
        assert items[-2]["reasons"] == ["Popular this week"]


class NoRecentItems:
    items: dict = {}


@pytest.mark.parametrize("seed", range(3))
def test_batched_and_single_customer_rankings_agree_and_are_the_exact_top(seed):
    scorer = random_factors(seed)
    customers = np.arange(len(scorer.user_factors))
    histories = np.full((len(customers), 1), -1)  # factors ignore the history
    batch = scorer.scores_batch(customers, None)
    # gemm and gemv may round differently (they do on some CPUs); errors up to the scorer's own bound stand in
    # for any BLAS, so the candidates' margin is exercised on every machine.
    _magnitude, error = scorer.score_bounds(customers, histories)
    rng = np.random.default_rng(seed)
    skewed = (batch + rng.uniform(-1, 1, batch.shape) * error[:, None] * 0.99).astype(np.float32)
    assert not np.array_equal(skewed, batch)
    positions, scores = personal_top(scorer, customers, histories, batch, 10)
    skewed_top = personal_top(scorer, customers, histories, skewed, 10)
    assert np.array_equal(skewed_top[0], positions) and np.array_equal(skewed_top[1], scores)
    items = np.arange(scorer.item_factors.shape[0])
    for customer in customers:
        one = personal_top(scorer, customers[[customer]], histories[[customer]], scorer.scores(customer, items)[None],
                           10)
        assert np.array_equal(one[0][0], positions[customer]) and np.array_equal(one[1][0], scores[customer])
        exact = scorer.exact_scores(customers[[customer]], histories[[customer]], items[None])[0]
        best = np.lexsort((items, -exact))[:10]  # over every item: candidates never lose a top one
        best = best[exact[best] > 0]
        assert np.array_equal(positions[customer][:len(best)], best)


def stable_argsort_picks(row: np.ndarray) -> list[int]:
    """What Recommender._reasons takes: a stable argsort, the positive ones of the first two."""
    return [int(i) for i in np.argsort(-row, kind="stable")[:2] if row[i] > 0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # exact contributions, approximate ones
def test_strongest_takes_what_a_stable_argsort_takes(dtype):
    rng = np.random.default_rng(5)
    weights = (rng.integers(-3, 4, size=(2000, 7)) / 2).astype(dtype)  # many ties, zeros, negatives
    picks, unsure = strongest(weights.copy(), 0.0)
    assert not unsure.any()
    for row, pick in zip(weights, picks):
        assert [int(p) for p in pick if p >= 0] == stable_argsort_picks(row)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("width", [1, 2, 3, 40])
def test_strongest_of_histories_padded_with_minus_infinity(dtype, width):
    """Rows of one to `width` weights, the rest -inf; a rank without a weight is no pick and settles the row."""
    rng = np.random.default_rng(width)
    weights = (rng.integers(-3, 4, size=(3000, width)) / 2).astype(dtype)
    weights[np.arange(width)[None, :] >= rng.integers(1, width + 1, size=(3000, 1))] = -np.inf
    picks, unsure = strongest(weights.copy(), 0.1)
    for row, pick, doubt in zip(weights, picks, unsure):
        assert [int(p) for p in pick if p >= 0] == stable_argsort_picks(row)
        assert doubt == could_change(row, 0.1)


def could_change(row: np.ndarray, error: float) -> bool:
    """Whether an error of `error` per weight could change the two picks of this row."""
    ranked = [*sorted(row[np.isfinite(row)], reverse=True), -np.inf, -np.inf, -np.inf]
    for value, following in zip(ranked[:2], ranked[1:3]):
        if value + error <= 0:
            return False  # no pick here for sure, nor after
        if not (value - error > 0 and value - following > 2 * error):
            return True
    return False


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_strongest_is_unsure_exactly_when_an_error_could_change_the_pick(dtype):
    rng = np.random.default_rng(6)
    exact = rng.standard_normal((5000, 6)) / 1000
    approx = (exact + rng.uniform(-0.99e-4, 0.99e-4, exact.shape)).astype(dtype)  # float32 rounds by < 1e-10
    sure_picks, unsure = strongest(approx.copy(), 1e-4)
    exact_picks, _ = strongest(exact.copy(), 0.0)
    assert np.array_equal(sure_picks[~unsure], exact_picks[~unsure])
    assert 0 < unsure.sum() < len(exact)


def test_reported_scores_are_rounded_and_stay_as_they_are_when_rounded_again():
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 12, 20000),
                             np.arange(-2000, 2000) / 1e6 + 5e-7, [0.0, 1e-300, 2.0**40 + 0.1234567]])
    shown = reported(values)
    assert [round(v, 6) for v in shown.tolist()] == shown.tolist()  # what Recommender.item_fields does to them
    assert np.all(np.abs(shown - values) <= 5e-7 + np.spacing(np.abs(values)))


@pytest.mark.parametrize("seed", range(3))
def test_approximate_contributions_stay_within_their_bound_and_pad_with_minus_infinity(seed):
    scorer = random_factors(seed)
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 500, 400)
    histories = np.where(rng.random((400, 30)) < 0.3, -1, rng.integers(0, 500, (400, 30)))
    approx, error = scorer.approx_contributions_batch(items, histories)
    exact = scorer.contributions_batch(items, histories)
    assert np.all(approx[histories < 0] == -np.inf)
    assert 0 < error < 1e-4 and np.all(np.abs(approx - exact)[histories >= 0] <= error)


def test_fixed_sums_do_not_depend_on_padding_nor_on_the_other_sums():
    rng = np.random.default_rng(8)
    terms = rng.standard_normal((37, 50)) * 10.0 ** rng.integers(-12, 12, (37, 50))  # wide range: rounding matters
    alone = [fixed_sum(terms[:, [j]], axis=0)[0] for j in range(50)]
    for padding in (0, 1, 27, 91):
        padded = np.concatenate([terms, np.zeros((padding, 50))])
        assert fixed_sum(padded, axis=0).tolist() == alone
    assert fixed_sum(terms.T, axis=1).tolist() == alone
    assert alone != terms.sum(axis=0).tolist()  # a plain sum rounds differently: the order is what is fixed
