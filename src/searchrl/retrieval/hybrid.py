"""Hybrid retrieval: fuse a sparse (BM25) and a dense retriever's rankings.

Each side fetches a larger candidate pool (``max(5k, 20)`` by default) for the whole batch of
queries, then the two lists are fused per query:

- ``rrf`` (default): reciprocal-rank fusion, score = sum over lists of ``1 / (k_rrf + rank)`` with
  1-based ranks (Cormack et al. 2009, ``k_rrf = 60``); it needs no score calibration.
- ``score``: each list's scores are min-max normalised to [0, 1] within the query's pool, then
  ``alpha * dense + (1 - alpha) * sparse`` (a passage missing from one list gets 0 there).

Ties are broken by the order of first appearance (sparse list first). Passages are identified by
``id``. Left out: learned fusion weights and more than two retrievers.
"""

from __future__ import annotations

from searchrl.retrieval.base import Retriever
from searchrl.types import Passage

FUSIONS = ("rrf", "score")


def rrf_fuse(lists: list[list[Passage]], k_rrf: float = 60.0) -> list[tuple[Passage, float]]:
    """Reciprocal-rank fusion of ranked lists, best first.

    >>> a, b, c = (Passage(i, "", "") for i in "abc")
    >>> [(p.id, round(s, 4)) for p, s in rrf_fuse([[a, b], [b, c]], k_rrf=1)]
    [('b', 0.8333), ('a', 0.5), ('c', 0.3333)]
    """
    fused: dict[str, float] = {}
    first: dict[str, Passage] = {}
    for ranked in lists:
        for rank, p in enumerate(ranked, start=1):
            fused[p.id] = fused.get(p.id, 0.0) + 1.0 / (k_rrf + rank)
            first.setdefault(p.id, p)
    order = sorted(fused, key=lambda pid: -fused[pid])  # stable: first appearance breaks ties
    return [(first[pid], fused[pid]) for pid in order]


def _minmax(ranked: list[Passage]) -> dict[str, float]:
    if not ranked:
        return {}
    scores = [float(p.score or 0.0) for p in ranked]
    lo, hi = min(scores), max(scores)
    span = hi - lo
    return {p.id: (1.0 if span == 0 else (s - lo) / span) for p, s in zip(ranked, scores)}


def score_fuse(
    sparse: list[Passage], dense: list[Passage], alpha: float = 0.5
) -> list[tuple[Passage, float]]:
    """Weighted sum of min-max normalised scores, best first.

    >>> a, b, c = (Passage(i, "", "", s) for i, s in zip("abc", (3.0, 1.0, 0.0)))
    >>> d = [Passage("c", "", "", 0.9), Passage("a", "", "", 0.5)]
    >>> [(p.id, round(s, 3)) for p, s in score_fuse([a, b, c], d, alpha=0.5)]
    [('a', 0.5), ('c', 0.5), ('b', 0.167)]
    """
    ns, nd = _minmax(sparse), _minmax(dense)
    first: dict[str, Passage] = {}
    for p in [*sparse, *dense]:
        first.setdefault(p.id, p)
    fused = {pid: alpha * nd.get(pid, 0.0) + (1 - alpha) * ns.get(pid, 0.0) for pid in first}
    order = sorted(first, key=lambda pid: -fused[pid])
    return [(first[pid], fused[pid]) for pid in order]


class HybridRetriever:
    """Sparse + dense retrieval with rank or score fusion, behind the Retriever interface."""

    kind = "hybrid"

    def __init__(
        self,
        sparse: Retriever,
        dense: Retriever,
        *,
        fusion: str = "rrf",
        k_rrf: float = 60.0,
        alpha: float = 0.5,
        pool: int | None = None,
    ):
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.sparse, self.dense = sparse, dense
        self.fusion, self.k_rrf, self.alpha, self.pool = fusion, float(k_rrf), float(alpha), pool

    @property
    def num_passages(self) -> int | None:
        return getattr(self.sparse, "num_passages", None) or getattr(self.dense, "num_passages", None)

    def describe(self) -> dict:
        return {"fusion": self.fusion, "k_rrf": self.k_rrf, "alpha": self.alpha, "pool": self.pool}

    def pool_size(self, k: int) -> int:
        return self.pool if self.pool else max(k * 5, 20)

    def search(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        """Top-``k`` fused passages per query; ``score`` is the fused score."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        n = max(self.pool_size(k), k)
        sparse_hits = self.sparse.search(list(queries), n)
        dense_hits = self.dense.search(list(queries), n)
        out = []
        for s, d in zip(sparse_hits, dense_hits):
            fused = rrf_fuse([s, d], self.k_rrf) if self.fusion == "rrf" else score_fuse(s, d, self.alpha)
            out.append([p.with_score(score) for p, score in fused[:k]])
        return out
