"""The recommendation service: cache, then the fallback chain personal -> context -> popular, with reasons."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np
import orjson

from recsvc import metrics
from recsvc.artifacts import ModelBundle
from recsvc.cache import Cache, recommendation_key
from recsvc.errors import InvalidInput, ModelUnavailable, NotFound
from recsvc.experiments import Assignment
from recsvc.model_store import ModelStore
from recsvc.ranking import personal_top
from recsvc.scoring import PopularityScorer, Scorer, top_k

POPULAR = "popular"
# The last step of the chain ranks by recent popularity when the model has it ("popular this week").
FALLBACK_STRATEGIES = ("trending", POPULAR)
MAX_REASON_ITEMS = 2
MAX_LISTED = 100  # category names an "unknown category" error lists at most
CHECK_CUSTOMER = "recsvc-check-unknown-customer"  # check_serves' customer the model does not know


@dataclass(frozen=True)
class RecommendationQuery:
    customer_id: str
    limit: int = 10
    strategy: str | None = None
    exclude: tuple[str, ...] = ()
    category: str | None = None
    context_items: tuple[str, ...] = ()
    include_owned: bool = False

    def cache_params(self) -> dict:
        return {"limit": self.limit, "exclude": sorted(self.exclude), "category": self.category,
                "context": sorted(self.context_items), "owned": self.include_owned}


@dataclass
class Ranked:
    """Items chosen so far, in order, with the step of the chain that chose each."""

    items: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def extend(self, positions: np.ndarray, scores: np.ndarray, source: str, limit: int) -> None:
        """Add a step's items (best first) after those chosen so far. Steps score on unrelated scales (a
        dot product, a count of customers), so a step whose best would outscore the last item before it is
        scaled down by one factor, to that item's score: the list's scores never increase."""
        if self.scores and len(scores) and scores[0] > self.scores[-1]:
            floor = self.scores[-1]
            scaled = np.asarray(scores, dtype=np.float64) * (floor / float(scores[0])) if floor > 0 else scores
            scores = np.minimum(scaled, floor)
        for position, score in zip(positions.tolist(), scores.tolist()):
            if len(self.items) >= limit:
                return
            if position not in self.items:
                self.items.append(position)
                self.scores.append(score)
                self.sources.append(source)


@dataclass(frozen=True)
class Eligible:
    """The items one request may be suggested: the catalog's rules, prepared once per model version
    (inactive items; a category's active items), less a few positions of this request (asked to exclude,
    owned, on the customer's screen). Ranking looks these up for its candidates only, so no request
    builds a mask over every item."""

    excluded: np.ndarray
    blocked: np.ndarray | None = None  # True for each inactive item; None when `among` is given
    blocked_positions: np.ndarray | None = None  # the same items by position, for mask()
    among: np.ndarray | None = None  # sorted positions to choose from: the requested category's active items

    @classmethod
    def of(cls, bundle: ModelBundle, category: str | None, excluded) -> "Eligible":
        excluded = np.asarray(excluded, dtype=np.int64)
        if category is None:
            return cls(excluded, blocked=bundle.catalog.inactive, blocked_positions=bundle.catalog.inactive_positions)
        return cls(excluded, among=bundle.catalog.active_in(category))

    def best(self, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best eligible (positions, scores), best first; `scores` is modified in place."""
        return top_k(scores, k, self.excluded, blocked=self.blocked, among=self.among)

    def mask(self, scores: np.ndarray) -> np.ndarray:
        """`scores` with -inf for every item this request may not be suggested, in place (for
        recsvc.ranking.personal_top, which ranks the whole row)."""
        scores[self.excluded] = -np.inf
        if self.blocked_positions is not None:  # a few thousand writes, not a pass over a mask of every item
            scores[self.blocked_positions] = -np.inf
        if self.among is not None:
            keep = scores[self.among]
            scores.fill(-np.inf)
            scores[self.among] = keep
        return scores


class _ScoreBuffers(threading.local):
    """One float32 array of item scores per server thread, reused by every step of every request it serves.
    A fresh one per step costs more than ranking it: at 400 KB (100k items) glibc maps it (the server sets
    MALLOC_MMAP_THRESHOLD_), faults in every page and unmaps it again."""

    def get(self, n_items: int) -> np.ndarray:
        buffer = getattr(self, "buffer", None)
        if buffer is None or len(buffer) != n_items:
            buffer = self.buffer = np.empty(n_items, dtype=np.float32)
        return buffer


_score_buffers = _ScoreBuffers()


def new_request_id() -> str:
    """32 random hex digits (as a uuid4 would give, without building the UUID object)."""
    return os.urandom(16).hex()


class Recommender:
    """Answers recommendation queries for the loaded model version; counts what it computes."""

    def __init__(self, store: ModelStore, cache: Cache, cache_ttl: float, experiments=None, recent_items=None):
        self.store = store
        self.cache = cache
        self.cache_ttl = cache_ttl
        self.experiments = experiments  # a recsvc.experiments.ExperimentRouter, or None
        self.recent_items = recent_items  # a recsvc.event_log.RecentItems, or None
        self.computations = 0  # lists computed from the model (not served from the cache), for tests and metrics

    def bundle(self) -> ModelBundle:
        bundle = self.store.current()
        if bundle is None:
            failure = self.store.last_failure
            raise ModelUnavailable("no model version is loaded yet: " + (
                f"the registry's version was refused ({failure.reason}); /readyz says more" if failure else
                "train one with `recsvc-train fit`"))
        return bundle

    def recommend(self, query: RecommendationQuery, request_id: str, expose: bool = True) -> tuple[bytes, bool]:
        """(JSON body, served from cache). The body is assembled around a cached fragment so each
        response carries its own request_id without re-encoding the list. `expose`: record the experiment's
        exposure (False for an answer no one will see: HEAD, or a batch that may still fail)."""
        body, hit, assignment = self._answer(query, request_id)
        if assignment and expose:  # also on cache hits: every serving counts
            self.experiments.expose(assignment, query.customer_id, request_id)
        return body, hit

    def _answer(self, query: RecommendationQuery, request_id: str) -> tuple[bytes, bool, Assignment | None]:
        bundle = self.bundle()
        assignment = self.experiments.assign(query.customer_id, query.strategy, bundle.scorers) \
            if self.experiments else None
        strategy = self._strategy(bundle, assignment.strategy if assignment else query.strategy)
        self._check_category(bundle, query.category)
        key = recommendation_key(bundle.version, strategy, query.customer_id, query.cache_params())
        # Concurrent misses of one key compute once; hit means this call did not compute.
        fragment, hit = self.cache.get_or_compute(key, query.customer_id,
                                                  lambda: orjson.dumps(self.compute(bundle, strategy, query)),
                                                  self.cache_ttl)
        metrics.observe_cache(hit)
        # The experiment stays outside the cached fragment, so a cached list never carries a stale one.
        head = orjson.dumps({"request_id": request_id, "experiment": assignment.ref() if assignment else None})
        return head[:-1] + b"," + fragment[1:], hit, assignment

    def recommend_batch(self, queries: list[RecommendationQuery], request_id: str) -> bytes:
        """One JSON body holding each query's answer, in order, all with the batch's request_id. Every entry is
        checked before any is computed, and exposures are recorded once all are answered: a refused batch
        leaves no trace."""
        bundle = self.bundle()
        for index, query in enumerate(queries):
            try:
                if query.strategy is not None:
                    self._strategy(bundle, query.strategy)
                self._check_category(bundle, query.category)
            except InvalidInput as error:
                raise InvalidInput(f"requests[{index}]: {error.message}", details={"index": index, **error.details})
        answers = [self._answer(query, request_id) for query in queries]
        for query, (_body, _hit, assignment) in zip(queries, answers):
            if assignment:
                self.experiments.expose(assignment, query.customer_id, request_id)
        bodies = [body for body, _hit, _assignment in answers]
        return b'{"request_id":' + orjson.dumps(request_id) + b',"results":[' + b",".join(bodies) + b"]}"

    def similar(self, item_id: str, limit: int, strategy: str | None, category: str | None) -> dict:
        """Items like `item_id` by the strategy's item similarity, topped up by popular ones; never the item
        itself or an inactive one."""
        return self.similar_in(self.bundle(), item_id, limit, strategy, category)

    def similar_in(self, bundle: ModelBundle, item_id: str, limit: int, strategy: str | None,
                   category: str | None) -> dict:
        """similar() with the given version (check_serves asks one that is not served yet)."""
        strategy = self._strategy(bundle, strategy)
        self._check_category(bundle, category)
        position = bundle.items.position(item_id)
        if position is None:
            raise NotFound(f"item {item_id!r} is not in the current model", details={"item_id": item_id})
        scorer = bundle.scorers[strategy]
        eligible = Eligible.of(bundle, category, [position])
        ranked = Ranked()
        if scorer.personal:  # zero or negative similarity is not "like this one": popular items fill those places
            ranked.extend(*_evidence(np.array(scorer.similar(position), dtype=np.float32), limit, eligible),
                          "similar", limit)
        fallback = scorer if not scorer.personal else fallback_scorer(bundle)
        if len(ranked.items) < limit:
            ranked.extend(*popular_step(fallback, np.empty(0, dtype=np.int64), limit, eligible), "popular", limit)
        similar = [f"Often chosen together with {item_label(bundle, position)}"]
        items = [self.item_fields(bundle, p, s, similar if source == "similar" else [popular_reason_text(fallback, p)])
                 for p, s, source in zip(ranked.items, ranked.scores, ranked.sources)]
        return {"item_id": item_id, "model_version": bundle.version, "strategy": strategy, "items": items}

    @staticmethod
    def _strategy(bundle: ModelBundle, strategy: str | None) -> str:
        strategy = strategy or bundle.default_strategy
        if strategy not in bundle.scorers:
            raise InvalidInput(f"unknown strategy {strategy!r}",
                               details={"strategy": strategy, "available": sorted(bundle.scorers)})
        return strategy

    @staticmethod
    def _check_category(bundle: ModelBundle, category: str | None) -> None:
        """A category no item has is a mistake (a typo, another catalog's name) to report, not an empty list."""
        if category is not None and not bundle.catalog.has_category(category):
            known = bundle.catalog.categories
            raise InvalidInput(f"unknown category {category!r}" if known else
                               f"unknown category {category!r}: the current model's catalog has no categories",
                               details={"category": category, "available": known[:MAX_LISTED],
                                        "categories": len(known)})

    def compute(self, bundle: ModelBundle, strategy: str, query: RecommendationQuery) -> dict:
        """The response body (less request_id) from the model, counted in the metrics by the step that answered."""
        self.computations += 1
        body = self.build_body(bundle, strategy, query)
        metrics.observe_source(body["source"])
        return body

    def build_body(self, bundle: ModelBundle, strategy: str, query: RecommendationQuery) -> dict:
        """The response body (less request_id) from the model: personal, topped up by context, then popular.
        Records nothing, so check_serves can run it on a version that serves no one yet."""
        customer = bundle.customers.position(query.customer_id)
        owned = bundle.owned_items(customer)
        if self.recent_items is not None:  # items from POST /v1/events count as owned straight away
            owned = self.recent_items.merge(bundle, query.customer_id, owned)
        context = np.asarray(bundle.items.positions(query.context_items), dtype=np.int64)
        eligible = self._eligible(bundle, owned, context, query)
        scorer = bundle.scorers[strategy]
        buffer = _score_buffers.get(len(bundle.items))
        ranked = Ranked()
        if customer is not None and scorer.personal and len(owned):
            ranked.extend(*_personal(scorer, customer, owned, query.limit, eligible, buffer), "personal",
                          query.limit)
        if len(context) and scorer.personal and len(ranked.items) < query.limit:
            ranked.extend(*_evidence(scorer.scores(None, context, buffer), query.limit, eligible), "context",
                          query.limit)
        # An explicitly requested non-personal strategy (popular, trending) is itself the last step.
        fallback = scorer if not scorer.personal else fallback_scorer(bundle)
        if len(ranked.items) < query.limit:
            ranked.extend(*popular_step(fallback, owned, query.limit, eligible, buffer), "popular", query.limit)
        source = ranked.sources[0] if ranked.sources else "popular"
        evidence = _evidence_items(scorer, ranked, owned, context)
        texts = catalog_texts(bundle, [*ranked.items, *(item for named in evidence.values() for item in named)])
        items = [item_dict(texts[pos], score, self._reasons(texts, fallback, pos, source, evidence.get(pos)))
                 for pos, score, source in zip(ranked.items, ranked.scores, ranked.sources)]
        return response_body(query.customer_id, bundle.version, strategy, source, items)

    @staticmethod
    def _eligible(bundle: ModelBundle, owned: np.ndarray, context: np.ndarray,
                  query: RecommendationQuery) -> Eligible:
        """What this query may be suggested: active, in the category, not excluded, not owned, not on screen."""
        excluded = bundle.items.positions(query.exclude)
        if not query.include_owned:  # the context items are already on the customer's screen
            excluded = np.concatenate([np.asarray(excluded, dtype=np.int64), owned, context])
        return Eligible.of(bundle, query.category, excluded)

    @staticmethod
    def item_fields(bundle: ModelBundle, position: int, score: float, reasons: list[str]) -> dict:
        return item_dict(catalog_texts(bundle, [position])[position], score, reasons)

    @staticmethod
    def _reasons(texts: dict[int, tuple[str, str, str]], fallback, position: int, source: str,
                 evidence: list[int] | None) -> list[str]:
        """Sentences an agent can say aloud for the item at `position`; `evidence`: the items that speak most
        for it (_evidence_items), whose catalog_texts are in `texts`."""
        if source == "popular":
            return [popular_reason_text(fallback, position)]
        return reason_texts(source, [label(texts[position]) for position in evidence or ()])


def check_serves(bundle: ModelBundle) -> None:
    """Answer a request of every kind with each strategy of `bundle`, through the code that serves them: a known
    customer, an unknown one with context items, one the popular step answers alone (in a category when the
    catalog has one), and similar items. The model store runs it before swapping a version in, so damage the
    array checks do not know of is refused (any exception) instead of answering every request with a 500.
    Uses no cache, experiment or recent items and records no metric."""
    recommender = Recommender(store=None, cache=None, cache_ttl=0.0)
    owners = np.flatnonzero(np.diff(bundle.owned.indptr))
    known = bundle.customers.external(int(owners[0])) if len(owners) else CHECK_CUSTOMER
    context = tuple(bundle.items.external(p) for p in sorted({0, len(bundle.items) - 1}))
    category = bundle.catalog.categories[0] if bundle.catalog.categories else None
    queries = (RecommendationQuery(known), RecommendationQuery(CHECK_CUSTOMER, context_items=context),
               RecommendationQuery(CHECK_CUSTOMER, category=category))
    for strategy in bundle.scorers:
        for query in queries:
            orjson.dumps(recommender.build_body(bundle, strategy, query))
        orjson.dumps(recommender.similar_in(bundle, context[0], 10, strategy, None))


def response_body(customer_id: str, model_version: str, strategy: str, source: str, items: list[dict]) -> dict:
    """A recommendations response less request_id and experiment (what the cache stores)."""
    return {"customer_id": customer_id, "model_version": model_version, "strategy": strategy, "source": source,
            "items": items}


def reason_texts(source: str, names: list[str]) -> list[str]:
    """The reasons of a personal or context suggestion, from the labels of the items that speak for it."""
    if not names:
        return ["Matches this customer's history" if source == "personal" else "Fits what the customer is looking at"]
    if source == "personal":
        return [f"Because the customer has {name}" for name in names]
    return [f"Goes with {name}, which the customer is looking at" for name in names]


def catalog_texts(bundle: ModelBundle, positions: list[int]) -> dict[int, tuple[str, str, str]]:
    """(item id, title, category) of each position, "" for no title or category: one read of each array for
    all of a list's items and reasons, not three numpy scalars per item and two per reason."""
    index = np.array(positions, dtype=np.int64)
    ids = bundle.items.ids[index].tolist()
    titles, categories = bundle.catalog.title[index].tolist(), bundle.catalog.category[index].tolist()
    return {position: (item_id.decode("utf-8"), str(title), str(category))
            for position, item_id, title, category in zip(positions, ids, titles, categories)}


def item_dict(texts: tuple[str, str, str], score: float, reasons: list[str]) -> dict:
    """One item of a response, from its catalog_texts: the score rounded to 6 decimals, title and category only
    when it has them."""
    item_id, title, category = texts
    item = {"item_id": item_id, "score": round(float(score), 6), "reasons": reasons}
    if title:
        item["title"] = title
    if category:
        item["category"] = category
    return item


def label(texts: tuple[str, str, str]) -> str:
    """How a reason names an item, from its catalog_texts: "Title (id)", or the id alone."""
    item_id, title, _category = texts
    return f"{title} ({item_id})" if title else item_id


def item_label(bundle: ModelBundle, position: int) -> str:
    return label(catalog_texts(bundle, [position])[position])


def _personal(scorer: Scorer, customer: int, owned: np.ndarray, limit: int, eligible: Eligible,
              buffer: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The customer's best items with a positive score, ranked by recsvc.ranking like the cache warm-up ranks them."""
    scores = eligible.mask(scorer.scores(customer, owned, buffer))
    positions, best = personal_top(scorer, np.array([customer]), owned[None, :], scores[None, :], limit)
    keep = positions[0] >= 0
    return positions[0][keep], best[0][keep]


def _evidence_items(scorer: Scorer, ranked: Ranked, owned: np.ndarray, context: np.ndarray) -> dict[int, list[int]]:
    """For each personal (context) item, the customer's items (the context items) that speak for it: at most
    MAX_REASON_ITEMS with a positive contribution, largest first, equal ones in the order of the history.
    Never the item itself (suggested with include_owned: "because the customer has X" says nothing for X).
    A step's contributions come from one call, exact, so the cache warm-up names the same reasons, and are
    ordered by one row-wise stable sort (fewer numpy calls than one argsort per item)."""
    evidence = {}
    for source, basis in (("personal", owned), ("context", context)):
        positions = [p for p, s in zip(ranked.items, ranked.sources) if s == source]
        if positions and len(basis):
            weights = scorer.contributions_to(np.array(positions), basis)
            weights = np.where(np.array(positions)[:, None] == basis[None, :], -np.inf, weights)
            order = np.argsort(-weights, axis=1, kind="stable")[:, :MAX_REASON_ITEMS]
            positive = np.take_along_axis(weights, order, axis=1) > 0
            for position, items, keep in zip(positions, basis[order].tolist(), positive.tolist()):
                evidence[position] = [item for item, kept in zip(items, keep) if kept]
    return evidence


def popular_step(fallback: Scorer, owned: np.ndarray, limit: int, eligible: Eligible,
                 buffer: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The last step of the chain: the best eligible items by popularity."""
    return eligible.best(fallback.scores(None, owned, buffer), limit)


def _evidence(scores: np.ndarray, limit: int, eligible: Eligible) -> tuple[np.ndarray, np.ndarray]:
    """The best eligible items keeping only positive scores: zero or less means the customer's items say
    nothing for an item, so the next step of the chain (popularity) should fill that place instead."""
    positions, best = eligible.best(scores, limit)
    keep = best > 0
    return positions[keep], best[keep]


def fallback_scorer(bundle: ModelBundle) -> Scorer:
    """The scorer of the chain's last step: trending when the model has it, else all-time popularity."""
    return next(bundle.scorers[name] for name in FALLBACK_STRATEGIES if name in bundle.scorers)


def popular_reason_text(scorer: Scorer, item: int | None = None) -> str:
    """Say "this week" only when the popularity was counted over the last week or less, and, of an item, only
    when a customer took it in that window (trending ranks the others by all-time popularity)."""
    window = getattr(scorer, "window_days", None) if isinstance(scorer, PopularityScorer) else None
    if window is not None and item is not None and not scorer.in_window(item):
        window = None
    if window is not None and window <= 7:
        return "Popular this week"
    if window is not None:
        return f"Popular over the last {window:g} days"
    return "Popular with customers"
