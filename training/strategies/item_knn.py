"""Item-to-item nearest neighbours (implicit.nearest_neighbours), served as a sparse item_similarity scorer."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from implicit.nearest_neighbours import BM25Recommender, CosineRecommender, TFIDFRecommender
from implicit.utils import ParameterWarning
from threadpoolctl import threadpool_limits

from recsvc.errors import InvalidInput
from recsvc.scoring import ItemSimilarityScorer
from training.strategies.base import Strategy, TrainingData

SIMILARITIES = ("bm25", "cosine", "tfidf")


class ItemKNNStrategy(Strategy):
    """Each item keeps its `neighbours` most similar items; a customer's score for an item is the
    sum of its similarities to the customer's items. `similarity` is bm25, cosine or tfidf."""

    name = "item_knn"
    defaults = {"similarity": "bm25", "neighbours": 100, "bm25_k1": 1.2, "bm25_b": 0.75, "threads": 0}
    search_space = {
        "similarity": list(SIMILARITIES),
        "neighbours": [20, 50, 100, 200, 400],
        "bm25_k1": [0.6, 1.2, 2.0],
        "bm25_b": [0.25, 0.5, 0.75, 1.0],
    }

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["similarity"] not in SIMILARITIES:
            raise InvalidInput(f"item_knn: similarity must be one of {', '.join(SIMILARITIES)}, "
                               f"not {self.params['similarity']!r}")

    def _model(self):
        p = self.params
        if p["similarity"] == "bm25":
            return BM25Recommender(K=int(p["neighbours"]), K1=float(p["bm25_k1"]), B=float(p["bm25_b"]),
                                   num_threads=int(p["threads"]))
        kind = CosineRecommender if p["similarity"] == "cosine" else TFIDFRecommender
        return kind(K=int(p["neighbours"]), num_threads=int(p["threads"]))

    def fit(self, data: TrainingData) -> ItemSimilarityScorer:
        model = self._model()
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            # implicit hands its own weighted COO matrix to its CSR-only kernel and warns about itself.
            warnings.filterwarnings("ignore", category=ParameterWarning)
            model.fit(data.matrix.tocsr(), show_progress=False)
        pairs = sp.coo_matrix(model.similarity)
        # An item's similarity to itself says nothing about what to suggest next.
        keep = (pairs.row != pairs.col) & (pairs.data != 0)
        similarity = sp.csr_matrix((pairs.data[keep].astype(np.float32), (pairs.row[keep], pairs.col[keep])),
                                   shape=pairs.shape, dtype=np.float32)
        similarity.sort_indices()
        self.scorer = ItemSimilarityScorer(similarity)
        return self.scorer
