"""The recommendation service: cache, then the fallback chain personal -> context -> popular, with reasons."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import orjson

from recsvc.artifacts import ModelBundle
from recsvc.cache import Cache, recommendation_key
from recsvc.errors import InvalidInput, ModelUnavailable
from recsvc.model_store import ModelStore
from recsvc.scoring import top_k

POPULAR = "popular"
MAX_REASON_ITEMS = 2


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
        for position, score in zip(positions.tolist(), scores.tolist()):
            if len(self.items) >= limit:
                return
            if position not in self.items:
                self.items.append(position)
                self.scores.append(score)
                self.sources.append(source)


def new_request_id() -> str:
    return uuid.uuid4().hex


class Recommender:
    """Answers recommendation queries for the loaded model version; counts what it computes."""

    def __init__(self, store: ModelStore, cache: Cache, cache_ttl: float):
        self.store = store
        self.cache = cache
        self.cache_ttl = cache_ttl
        self.computations = 0  # lists computed from the model (not served from the cache), for tests and metrics

    def bundle(self) -> ModelBundle:
        bundle = self.store.current()
        if bundle is None:
            raise ModelUnavailable("no model version is loaded yet; train one with `recsvc-train fit`")
        return bundle

    def recommend(self, query: RecommendationQuery, request_id: str) -> tuple[bytes, bool]:
        """(JSON body, served from cache). The body is assembled around a cached fragment so each
        response carries its own request_id without re-encoding the list."""
        bundle = self.bundle()
        strategy = query.strategy or bundle.default_strategy
        if strategy not in bundle.scorers:
            raise InvalidInput(f"unknown strategy {strategy!r}",
                               details={"strategy": strategy, "available": sorted(bundle.scorers)})
        key = recommendation_key(bundle.version, strategy, query.customer_id, query.cache_params())
        fragment = self.cache.get(key)
        hit = fragment is not None
        if not hit:
            fragment = orjson.dumps(self.compute(bundle, strategy, query))
            self.cache.set(key, fragment, self.cache_ttl)
        return b'{"request_id":' + orjson.dumps(request_id) + b"," + fragment[1:], hit

    def compute(self, bundle: ModelBundle, strategy: str, query: RecommendationQuery) -> dict:
        """The response body (less request_id) from the model: personal, topped up by context, then popular."""
        self.computations += 1
        customer = bundle.customers.position(query.customer_id)
        owned = bundle.owned_items(customer)
        context = np.asarray(bundle.items.positions(query.context_items), dtype=np.int64)
        excluded = self._excluded(bundle, owned, query)
        scorer = bundle.scorers[strategy]
        ranked = Ranked()
        if customer is not None and scorer.personal and len(owned):
            ranked.extend(*top_k(scorer.scores(customer, owned), query.limit, excluded), "personal", query.limit)
        if len(context) and scorer.personal and len(ranked.items) < query.limit:
            ranked.extend(*top_k(scorer.scores(None, context), query.limit, excluded), "context", query.limit)
        if len(ranked.items) < query.limit:
            popularity = bundle.scorers[POPULAR].scores(None, owned)
            ranked.extend(*top_k(popularity, query.limit, excluded), "popular", query.limit)
        return {
            "customer_id": query.customer_id,
            "model_version": bundle.version,
            "strategy": strategy,
            "source": ranked.sources[0] if ranked.sources else "popular",
            "experiment": None,
            "items": [self._item(bundle, scorer, pos, score, source, owned, context)
                      for pos, score, source in zip(ranked.items, ranked.scores, ranked.sources)],
        }

    @staticmethod
    def _excluded(bundle: ModelBundle, owned: np.ndarray, query: RecommendationQuery) -> np.ndarray:
        """Item positions never to suggest: inactive, asked to exclude, outside the category, owned."""
        mask = ~np.asarray(bundle.catalog.active, dtype=bool)
        mask[bundle.items.positions(query.exclude)] = True
        if query.category is not None:
            mask |= np.asarray(bundle.catalog.category) != query.category
        if not query.include_owned:
            mask[owned] = True
        return np.flatnonzero(mask)

    def _item(self, bundle: ModelBundle, scorer, position: int, score: float, source: str,
              owned: np.ndarray, context: np.ndarray) -> dict:
        item = {"item_id": bundle.items.external(position), "score": round(float(score), 6),
                "reasons": self._reasons(bundle, scorer, position, source, owned, context)}
        title = str(bundle.catalog.title[position])
        if title:
            item["title"] = title
        category = str(bundle.catalog.category[position])
        if category:
            item["category"] = category
        return item

    @staticmethod
    def _reasons(bundle: ModelBundle, scorer, position: int, source: str, owned: np.ndarray,
                 context: np.ndarray) -> list[str]:
        """Sentences an agent can say aloud."""
        if source == "popular":
            return ["Popular with customers right now"]
        basis = owned if source == "personal" else context
        weights = scorer.contributions(position, basis)
        order = np.argsort(-weights, kind="stable")[:MAX_REASON_ITEMS]
        names = [_label(bundle, int(basis[i])) for i in order if weights[i] > 0]
        if not names:
            return ["Matches this customer's history" if source == "personal" else "Fits what the customer is looking at"]
        if source == "personal":
            return [f"Because the customer has {name}" for name in names]
        return [f"Goes with {name}, which the customer is looking at" for name in names]


def _label(bundle: ModelBundle, position: int) -> str:
    title = str(bundle.catalog.title[position])
    return f"{title} ({bundle.items.external(position)})" if title else bundle.items.external(position)
