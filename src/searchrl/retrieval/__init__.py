"""Search engines the model can call, all behind one batch-first :class:`Retriever` interface.

``bm25`` (bm25s + stemming), ``dense`` (an embedding model + FAISS), ``hybrid`` (fusion of the two),
``rerank`` (an optional cross-encoder stage), ``faiss_index`` (Flat / HNSW / IVF / IVF-PQ / OPQ /
HNSW-SQ indexes, mmap loading), ``cache`` (SQLite record/replay of searches), ``index`` (build /
save / load self-describing index directories), ``server`` (FastAPI app with the Search-R1
``/retrieve`` contract) and ``client`` (``HttpRetriever``, the same interface over HTTP).
"""

from searchrl.retrieval.base import Retriever

__all__ = ["Retriever"]
