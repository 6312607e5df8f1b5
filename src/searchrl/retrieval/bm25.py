"""Sparse retrieval: BM25 over passages' ``contents`` (title + text) with bm25s and PyStemmer.

Tokenisation is bm25s's own (lower-case, ``\\b\\w\\w+\\b`` words, English stop words, Snowball
English stemmer), so scores equal a ``bm25s.BM25`` built the usual way from the same texts. Scoring
uses bm25s's precomputed sparse matrix; the top-k selection is ours so that ties are broken
deterministically (lower passage number first) and passages that share no term with the query
(score 0) are never returned, as in Lucene/pyserini: a query with no known term gets an empty list.

``BM25Retriever.load(mmap=True)`` memory-maps bm25s's score arrays (only the vocabulary is read into
memory), so start-up does not read the index and resident memory grows with the terms searched.

Left out: bm25s's numba/JAX back ends (not installed here) and BM25 variants other than the
``lucene`` default (they can be passed through ``method=`` but are not tested).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from searchrl.errors import IndexFormatError
from searchrl.types import Passage

logger = logging.getLogger(__name__)

PARAMS_FILE = "searchrl_bm25.json"  # our tokenizer settings, next to bm25s's own files
BM25S_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy",
               "vocab.index.json", "params.index.json")


def _bm25s():
    """Import bm25s, silencing its logger (it sets itself to DEBUG on import)."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def _stemmer(language: str | None):
    if not language:
        return None
    import Stemmer

    return Stemmer.Stemmer(language)


def top_k_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first, ties broken by lower index.

    >>> top_k_desc(np.array([0.5, 2.0, 0.5, 3.0]), 3).tolist()
    [3, 1, 0]
    """
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        kth = np.partition(scores, n - k)[n - k]  # the k-th largest value
        cand = np.flatnonzero(scores >= kth)  # every index that can be in the top k (ties kept)
    else:
        cand = np.arange(n)
    order = np.lexsort((cand, -scores[cand]))  # by score desc, then index asc
    return cand[order[:k]]


class BM25Retriever:
    """BM25 search over a fixed list of passages.

    Build with :meth:`build`; persist with :meth:`save` / :meth:`load` (the passages themselves are
    stored by :mod:`searchrl.retrieval.index`, so ``load`` takes them as an argument).
    """

    kind = "bm25"

    def __init__(
        self,
        model: Any,
        passages: Sequence[Passage],
        *,
        stemmer: str | None = "english",
        stopwords: str | list[str] | None = "en",
        n_threads: int = 1,
    ):
        num_docs = int(model.scores["num_docs"])
        if num_docs != len(passages):
            raise ValueError(f"BM25 model has {num_docs} documents but {len(passages)} passages given")
        self.model = model
        self.passages = passages
        self.stemmer_language = stemmer
        self.stopwords = stopwords
        self.n_threads = max(1, int(n_threads))
        self._stemmer = _stemmer(stemmer)

    @property
    def num_passages(self) -> int:
        return len(self.passages)

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        passages: Sequence[Passage],
        *,
        stemmer: str | None = "english",
        stopwords: str | list[str] | None = "en",
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        show_progress: bool = True,
        n_threads: int = 1,
    ) -> "BM25Retriever":
        """Index ``passages`` (their ``contents``: quoted title, newline, text).

        Texts are read one at a time (from an index's memory-mapped :class:`PassageStore` they are
        never all in memory at once); the token ids of every passage are, as bm25s needs them.
        """
        bm25s = _bm25s()

        if len(passages) == 0:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        texts = (passages[i].contents for i in range(len(passages)))  # streamed: no list of all texts
        tokens = bm25s.tokenize(
            texts, stopwords=stopwords, stemmer=_stemmer(stemmer), show_progress=show_progress
        )
        model = bm25s.BM25(k1=k1, b=b, method=method)
        model.index(tokens, show_progress=show_progress)
        return cls(model, passages, stemmer=stemmer, stopwords=stopwords, n_threads=n_threads)

    def describe(self) -> dict[str, Any]:
        """Settings recorded in the index manifest."""
        m = self.model
        return {
            "stemmer": self.stemmer_language,
            "stopwords": self.stopwords,
            "k1": m.k1,
            "b": m.b,
            "method": m.method,
            "vocab_size": len(m.vocab_dict),
            "num_docs": int(m.scores["num_docs"]),
        }

    def save(self, directory: str | Path) -> None:
        """Write bm25s's arrays and our tokenizer settings into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save(str(directory), show_progress=False)
        (directory / PARAMS_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")

    @classmethod
    def load(
        cls, directory: str | Path, passages: Sequence[Passage], *, mmap: bool = False, n_threads: int = 1
    ) -> "BM25Retriever":
        """Load what :meth:`save` wrote; a missing or corrupt file raises ``IndexFormatError``."""
        bm25s = _bm25s()

        directory = Path(directory)
        for name in (*BM25S_FILES, PARAMS_FILE):
            if not (directory / name).is_file():
                raise IndexFormatError(f"missing BM25 file {directory / name}")
        try:
            params = json.loads((directory / PARAMS_FILE).read_text())
            if not isinstance(params, dict):
                raise ValueError(f"{PARAMS_FILE} holds {type(params).__name__}, not an object")
            model = bm25s.BM25.load(str(directory), mmap=mmap, load_corpus=False, show_progress=False)
            _check_arrays(model, scan=not mmap)
        except (ValueError, OSError, EOFError, KeyError, TypeError, AttributeError) as e:
            # (AttributeError: bm25s reading a JSON file that holds a number or a list, not an object)
            raise IndexFormatError(f"{directory}: corrupt BM25 index ({e})") from e
        if int(model.scores["num_docs"]) != len(passages):
            raise IndexFormatError(
                f"{directory} indexes {model.scores['num_docs']} documents but the index has "
                f"{len(passages)} passages: the files do not belong together; rebuild the index"
            )
        return cls(
            model,
            passages,
            stemmer=params.get("stemmer"),
            stopwords=params.get("stopwords"),
            n_threads=n_threads,
        )

    # ---------------------------------------------------------------- searching
    def tokenize_queries(self, queries: list[str]) -> list[np.ndarray]:
        """Vocabulary ids of each query's known tokens (unknown ones dropped, repeats kept)."""
        bm25s = _bm25s()

        tokens = bm25s.tokenize(
            queries,
            stopwords=self.stopwords,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )
        vocab = self.model.vocab_dict
        return [np.asarray([vocab[t] for t in q if t and t in vocab], dtype=np.int64) for q in tokens]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for one query, shape (num_passages,)."""
        ids = self.tokenize_queries([query])[0]
        if ids.size == 0:
            return np.zeros(len(self.passages), dtype=np.float32)
        return self.model.get_scores_from_ids(ids)

    def _search_one(self, token_ids: np.ndarray, k: int) -> list[tuple[int, float]]:
        if token_ids.size == 0:
            return []
        scores = self.model.get_scores_from_ids(token_ids)  # (num_passages,)
        matching = np.flatnonzero(scores > 0)  # passages sharing a term with the query, ascending
        top = matching[top_k_desc(scores[matching], k)]
        return [(int(i), float(scores[i])) for i in top]

    def search(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        """Top-``k`` passages per query, best first; fewer when fewer passages match any term."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        token_ids = self.tokenize_queries(list(queries))
        if self.n_threads > 1 and len(queries) > 1:
            with ThreadPoolExecutor(self.n_threads) as pool:
                hits = list(pool.map(lambda ids: self._search_one(ids, k), token_ids))
        else:
            hits = [self._search_one(ids, k) for ids in token_ids]
        return [[self.passages[i].with_score(s) for i, s in row] for row in hits]


def _check_arrays(model: Any, scan: bool = True) -> None:
    """Cheap consistency checks on a loaded bm25s model (catches truncated/mixed-up files).

    ``scan=False`` skips the one check that reads a whole array (document ids in range), so that
    a memory-mapped index is not read in full at start-up.
    """
    s = model.scores
    data, indices, indptr = s["data"], s["indices"], s["indptr"]
    if data.shape != indices.shape:
        raise ValueError(f"data has {data.shape[0]} entries but indices {indices.shape[0]}")
    # every real token id needs a column; bm25s appends the empty token "" after the last column
    columns = max((v for t, v in model.vocab_dict.items() if t != ""), default=-1) + 1
    if indptr.ndim != 1 or indptr.shape[0] != columns + 1:
        raise ValueError(f"indptr has {indptr.shape[0]} entries, expected {columns + 1} for the vocabulary")
    if int(indptr[-1]) != data.shape[0]:
        raise ValueError(f"indptr ends at {int(indptr[-1])} but there are {data.shape[0]} scores")
    num_docs = s.get("num_docs")
    if num_docs is None:
        raise ValueError("params.index.json has no num_docs")
    if scan and indices.size and int(indices.max()) >= int(num_docs):
        raise ValueError("document index out of range: arrays do not match num_docs")
