"""The retriever interface every search engine in searchrl implements.

A retriever is batch-first: one call takes many queries and returns, for each, up to ``k`` passages
sorted by decreasing score (``Passage.score`` set). Implementations must be safe to call from one
thread at a time; the HTTP server serialises or batches calls itself.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from searchrl.types import Passage


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        """Top-``k`` passages for each query, best first, each with ``score`` set."""
        ...
