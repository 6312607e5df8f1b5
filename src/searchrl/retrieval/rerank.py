"""Optional cross-encoder re-ranking stage behind the same Retriever interface.

``RerankRetriever`` asks its base retriever for ``fetch_k`` candidates per query (Search-R1's
original set-up: retrieve 10, keep 3), scores every (query, passage ``contents``) pair with a
sentence-transformers ``CrossEncoder`` loaded from a local folder, and returns the ``k`` best by that
score (``Passage.score`` = the cross-encoder's score; ties keep the base order). All pairs of a
batch of queries go through the model in one ``predict`` call.

Left out: shipping a cross-encoder (none is available offline; bring your own folder, e.g. a
fine-tuned MiniLM or BGE reranker) and score fusion with the first stage.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from searchrl.errors import ConfigError
from searchrl.retrieval.base import Retriever
from searchrl.types import Passage


class RerankRetriever:
    """Re-order a base retriever's top ``fetch_k`` candidates with a cross-encoder."""

    def __init__(
        self,
        base: Retriever,
        cross_encoder_path: str,
        fetch_k: int = 10,
        *,
        batch_size: int = 32,
        max_length: int | None = 512,
        device: str | None = None,
    ):
        from sentence_transformers import CrossEncoder

        if not os.path.isdir(cross_encoder_path):
            raise ConfigError(f"cross-encoder folder not found: {cross_encoder_path}")
        if fetch_k < 1:
            raise ConfigError(f"fetch_k must be >= 1, got {fetch_k}")
        self.base = base
        self.path = cross_encoder_path
        self.fetch_k = int(fetch_k)
        self.batch_size = int(batch_size)
        try:
            self.model: Any = CrossEncoder(
                cross_encoder_path, max_length=max_length, device=device, local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load cross-encoder from {cross_encoder_path}: {e}") from e
        self.kind = f"{getattr(base, 'kind', type(base).__name__)}+rerank"

    @property
    def fingerprint(self) -> str | None:
        """The base index's fingerprint extended with this stage's settings (for search caches)."""
        import hashlib

        base = getattr(self.base, "fingerprint", None)
        if base is None:
            return None
        own = f"{base}|rerank|{os.path.abspath(self.path)}|{self.fetch_k}"
        return "sha256:" + hashlib.sha256(own.encode()).hexdigest()

    @property
    def num_passages(self) -> int | None:
        return getattr(self.base, "num_passages", None)

    def search(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        """Top-``k`` of the base retriever's ``max(fetch_k, k)`` candidates, by cross-encoder score."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        candidates = self.base.search(list(queries), max(self.fetch_k, k))
        pairs = [(q, p.contents) for q, cands in zip(queries, candidates) for p in cands]
        if not pairs:
            return [[] for _ in queries]
        scores = np.asarray(
            self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False), dtype=np.float64
        ).reshape(len(pairs))  # (total candidates,)
        out, start = [], 0
        for cands in candidates:
            s = scores[start : start + len(cands)]
            start += len(cands)
            order = np.argsort(-s, kind="stable")[:k]
            out.append([cands[i].with_score(float(s[i])) for i in order])
        return out
