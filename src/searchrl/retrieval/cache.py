"""Record / replay of searches: a SQLite-backed cache in front of any :class:`Retriever`.

``CachedRetriever(retriever, FILE)`` answers each ``(query, k)`` it has seen before from ``FILE``
and sends only the others (each distinct query once per call) to the wrapped retriever, storing
their results. Entries are keyed by ``(index fingerprint, query, k)`` and hold the passages (id,
title, text, score) as JSON, whose floats round-trip exactly: a rerun of a training or evaluation
step gets the same results byte for byte, and repeated queries (a GRPO group asking the same
thing) cost one search. Results are served from the stored form on the first call too, so a
recorded run and its replay see identical objects.

The file records the fingerprint of the index it was made with (``load_index`` sets
``retriever.fingerprint`` from the manifest and the query-time settings); opening it with another
index raises :class:`~searchrl.errors.ConfigError` (a rebuilt index counts as another one: its
manifest records when it was built, and a rebuild need not give identical FAISS structures).
``mode="replay"`` never calls the retriever and raises :class:`CacheMiss` for a query the file lacks
(strict replay). ``stats()`` gives lookup, hit and miss counts and the hit rate since the wrapper
was created; the counts are also logged every ``log_every`` lookups.

Left out: eviction (the file grows with the distinct (query, k) pairs and their passages), sharing
one file between processes that write at the same time (SQLite serialises them; fine for one
server and its restarts, slow for many writers), and serving a smaller ``k`` from a larger one.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

from searchrl.errors import ConfigError, SearchRLError
from searchrl.retrieval.base import Retriever
from searchrl.types import Passage

logger = logging.getLogger(__name__)

FORMAT = "searchrl-search-cache-1"
MODES = ("readwrite", "replay")
_CHUNK = 500  # queries per SELECT (SQLite's bound-parameter limit is 999 on old builds)


class CacheMiss(SearchRLError):
    """A replay-only cache was asked a query it has not recorded."""


def encode_hits(hits: list[Passage]) -> str:
    """JSON of one query's passages: ``[[id, title, text, score], ...]`` (floats exact)."""
    return json.dumps([[p.id, p.title, p.text, p.score] for p in hits], ensure_ascii=False)


def decode_hits(payload: str) -> list[Passage]:
    """Inverse of :func:`encode_hits`.

    >>> decode_hits(encode_hits([Passage("1", "T", "x", 0.1 + 0.2)]))[0].score == 0.1 + 0.2
    True
    """
    return [Passage(str(i), t, x, s) for i, t, x, s in json.loads(payload)]


class CachedRetriever:
    """``retriever`` with its results recorded in (and replayed from) the SQLite file ``path``."""

    def __init__(
        self,
        retriever: Retriever,
        path: str | Path,
        *,
        fingerprint: str | None = None,
        mode: str = "readwrite",
        log_every: int = 10_000,
    ):
        if mode not in MODES:
            raise ConfigError(f"cache mode must be one of {', '.join(MODES)}, got {mode!r}")
        fingerprint = fingerprint or getattr(retriever, "fingerprint", None)
        if not fingerprint:
            raise ConfigError(
                "a search cache needs the index fingerprint: load the index with load_index "
                "(which sets it) or pass fingerprint= (e.g. for a remote retriever)"
            )
        self.retriever, self.path, self.mode = retriever, Path(path), mode
        self.fingerprint = str(fingerprint)
        self.log_every = max(1, int(log_every))
        self.lookups = self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._db = self._open()

    # ------------------------------------------------------------------ the file
    def _open(self) -> sqlite3.Connection:
        if self.mode == "replay" and not self.path.is_file():
            raise ConfigError(f"search cache {self.path} does not exist (replay mode needs a recorded file)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS results (fingerprint TEXT NOT NULL, query TEXT NOT NULL, "
                "k INTEGER NOT NULL, hits TEXT NOT NULL, PRIMARY KEY (fingerprint, query, k)) WITHOUT ROWID"
            )
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"search cache {self.path} is not a readable SQLite file ({e})") from e
        if not meta:
            db.executemany("INSERT INTO meta VALUES (?, ?)", [("format", FORMAT), ("fingerprint", self.fingerprint)])
        elif meta.get("format") != FORMAT:
            raise ConfigError(f"{self.path} is not a searchrl search cache (format {meta.get('format')!r})")
        elif meta.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"search cache {self.path} was recorded with another index or other search settings "
                f"({meta.get('fingerprint')}, this one is {self.fingerprint}); use another cache file"
            )
        return db

    def entries(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ the Retriever interface
    @property
    def kind(self) -> str:
        return str(getattr(self.retriever, "kind", type(self.retriever).__name__))

    @property
    def num_passages(self) -> int | None:
        return getattr(self.retriever, "num_passages", None)

    def _lookup(self, queries: list[str], k: int) -> dict[str, str]:
        found: dict[str, str] = {}
        for lo in range(0, len(queries), _CHUNK):
            chunk = queries[lo : lo + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT query, hits FROM results WHERE fingerprint = ? AND k = ? AND query IN ({marks})",
                [self.fingerprint, k, *chunk],
            ).fetchall()
            found.update(rows)
        return found

    def search(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        """Top-``k`` passages per query: recorded ones replayed, the others searched and recorded."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        distinct = list(dict.fromkeys(queries))
        with self._lock:
            found = self._lookup(distinct, k)
        missing = [q for q in distinct if q not in found]
        if missing and self.mode == "replay":
            raise CacheMiss(f"{len(missing)} of {len(distinct)} queries are not in {self.path}: {missing[0]!r}")
        if missing:
            hits = self.retriever.search(missing, k)
            if len(hits) != len(missing):
                raise RuntimeError(f"retriever returned {len(hits)} result lists for {len(missing)} queries")
            new = {q: encode_hits(h) for q, h in zip(missing, hits)}
            with self._lock:
                self._db.executemany(
                    "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?)",
                    [(self.fingerprint, q, k, payload) for q, payload in new.items()],
                )
            found.update(new)
        self._count(len(queries), len(missing))
        return [decode_hits(found[q]) for q in queries]

    # ------------------------------------------------------------------ counters
    def _count(self, lookups: int, misses: int) -> None:
        with self._lock:
            before = self.lookups // self.log_every
            self.lookups += lookups
            self.misses += misses
            self.hits += lookups - misses
            if self.lookups // self.log_every != before:
                logger.info("search cache %s: %s", self.path, self.stats_line())

    def stats(self) -> dict[str, Any]:
        """Lookups, hits (recorded or repeated in the same call), misses and hit rate since start."""
        rate = self.hits / self.lookups if self.lookups else None
        return {"lookups": self.lookups, "hits": self.hits, "misses": self.misses, "hit_rate": rate}

    def stats_line(self) -> str:
        s = self.stats()
        rate = "-" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.1f}%"
        return f"{s['lookups']} lookups, {s['hits']} hits, {s['misses']} misses, hit rate {rate}"
