"""Self-describing index directories: build, save and load BM25, dense and hybrid retrievers.

Layout of an index directory::

    DIR/manifest.json            format version, kind, settings, corpus path + fingerprint, counts
    DIR/passages.jsonl           the passages ({"id","title","text"} a line), so no corpus is needed
    DIR/passages.offsets.npy     byte offset of every line (+ file size): random access, no full load
    DIR/bm25/                    bm25s arrays + tokenizer settings        (kind bm25 or hybrid)
    DIR/dense/                   faiss.index + dense.json (model, FAISS)  (kind dense or hybrid)
                                 + vectors.npy (float16 refine copy, compressed FAISS types)

A build writes into ``DIR.tmp`` and renames it to ``DIR`` at the end, so ``DIR`` is either absent
or complete. An interrupted build leaves ``DIR.tmp`` with a ``build_state.json``; running the same
build again (same corpus fingerprint and settings) resumes it: the passage copy, the BM25 index and
every complete embedding shard are kept. Loading checks the manifest, the files and their counts
and dimensions, and raises :class:`~searchrl.errors.IndexFormatError` naming what is wrong.
``load_index(mmap=True)`` maps the BM25 arrays and the FAISS index instead of reading them, and
every loaded retriever carries a ``fingerprint`` (manifest + query-time settings) that search
caches (:mod:`searchrl.retrieval.cache`) are keyed by.

Left out: incremental updates (adding passages to an existing index) and remote storage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, overload

import numpy as np

import searchrl
from searchrl.errors import ConfigError, DataFormatError, IndexFormatError
from searchrl.retrieval.base import Retriever
from searchrl.types import Passage

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("bm25", "dense", "hybrid")
MANIFEST = "manifest.json"
PASSAGES = "passages.jsonl"
OFFSETS = "passages.offsets.npy"
BUILD_STATE = "build_state.json"


# ------------------------------------------------------------------------------ passage store
def write_passages(passages: Iterable[Passage], directory: Path) -> dict[str, Any]:
    """Write passages.jsonl + offsets into ``directory``; returns {"count", "bytes", "sha256"}."""
    offsets, digest = [0], hashlib.sha256()
    with open(directory / PASSAGES, "wb") as f:
        for p in passages:
            line = json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False)
            data = line.encode("utf-8") + b"\n"
            f.write(data)
            digest.update(data)
            offsets.append(offsets[-1] + len(data))
    np.save(directory / OFFSETS, np.asarray(offsets, dtype=np.int64))
    return {"count": len(offsets) - 1, "bytes": offsets[-1], "sha256": digest.hexdigest()}


class PassageStore(Sequence[Passage]):
    """Read-only random access to an index's passages through a memory map (nothing parsed upfront)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        path, opath = directory / PASSAGES, directory / OFFSETS
        for p in (path, opath):
            if not p.is_file():
                raise IndexFormatError(f"missing passages file {p}")
        try:
            self.offsets = np.load(opath)  # (n + 1,) int64
        except (ValueError, OSError, EOFError) as e:
            raise IndexFormatError(f"{opath}: corrupt offsets file ({e})") from e
        size = path.stat().st_size
        if self.offsets.ndim != 1 or self.offsets.size < 2 or np.any(np.diff(self.offsets) <= 0):
            raise IndexFormatError(f"{opath}: offsets are not a strictly increasing list")
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != size:
            raise IndexFormatError(
                f"{path} has {size} bytes but its offsets end at {int(self.offsets[-1])}: "
                "the passages file was truncated or replaced; rebuild the index"
            )
        self.path = path
        self._file = open(path, "rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    @overload
    def __getitem__(self, i: int) -> Passage: ...
    @overload
    def __getitem__(self, i: slice) -> list[Passage]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"passage {i} out of range (0..{n - 1})")
        raw = self._mm[int(self.offsets[i]) : int(self.offsets[i + 1])]
        try:
            d = json.loads(raw)
            return Passage(str(d["id"]), d.get("title", ""), d["text"])
        except (ValueError, KeyError, TypeError) as e:
            raise IndexFormatError(f"{self.path}: passage {i + 1} is corrupt ({e!r})") from e

    def sha256(self) -> str:
        return hashlib.sha256(self._mm).hexdigest()

    def close(self) -> None:
        if not self._mm.closed:
            self._mm.close()
        self._file.close()

    def __del__(self):
        if hasattr(self, "_mm"):
            self.close()


# ------------------------------------------------------------------------------ options
@dataclasses.dataclass
class BuildOptions:
    """Settings of :func:`build_index` (all optional). Unknown names fail with this list."""

    overwrite: bool = False  # replace an existing output directory
    show_progress: bool = True
    # bm25
    stemmer: str | None = "english"  # PyStemmer language, None = no stemming
    stopwords: str | None = "en"  # bm25s stop-word list, None = keep all words
    k1: float = 1.5
    b: float = 0.75
    # dense
    model: str | None = None  # local path or hub id; None = all-MiniLM-L6-v2 (offline package)
    pooling: str | None = None  # mean | cls; None = the model's own (sentence-transformers) or mean
    normalize: bool | None = None
    query_prefix: str | None = None  # None = "query: " for e5 models, else ""
    passage_prefix: str | None = None
    max_length: int | None = None
    batch_size: int = 64
    device: str | None = None
    dtype: str = "float32"
    faiss: str = "flat"  # flat | hnsw | ivf | ivfpq | opq | hnswsq
    nlist: int | None = None  # IVF lists; None = about 4*sqrt(n)
    hnsw_m: int = 32
    pq_m: int | None = None  # PQ bytes a vector (ivfpq, opq); None = dim / 8
    pq_bits: int = 8
    sq: str = "sq8"  # hnswsq codes: sq8 | sq4 | fp16
    train_size: int | None = None  # codebook training sample; None = 64 per centroid, <= 1M
    refine: str | None = "auto"  # float16 | float32 | none; auto = float16 for ivfpq/opq/hnswsq
    shard_size: int = 10_000  # passages per embedding shard (the unit of resumption)
    # hybrid
    fusion: str = "rrf"  # rrf | score
    k_rrf: float = 60.0
    alpha: float = 0.5

    def __post_init__(self):
        from searchrl.retrieval.dense import POOLINGS
        from searchrl.retrieval.faiss_index import COMPRESSED_TYPES, FAISS_TYPES
        from searchrl.retrieval.hybrid import FUSIONS

        checks = [
            (self.faiss in FAISS_TYPES, f"faiss must be one of {', '.join(FAISS_TYPES)}, got {self.faiss!r}"),
            (self.pooling in (None, *POOLINGS), f"pooling must be one of {', '.join(POOLINGS)}"),
            (self.fusion in FUSIONS, f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}"),
            (0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}"),
            (self.refine in (None, "auto", "none", "float16", "float32"),
             f"refine must be auto, none, float16 or float32, got {self.refine!r}"),
        ]
        if self.refine == "auto":
            self.refine = "float16" if self.faiss in COMPRESSED_TYPES else None
        elif self.refine == "none":
            self.refine = None
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @classmethod
    def from_kwargs(cls, opts: dict[str, Any]) -> "BuildOptions":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(opts) - set(names))
        if unknown:
            raise ConfigError(f"unknown index option(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        return cls(**opts)

    def state_key(self, kind: str) -> dict[str, Any]:
        """The settings that change the built files (a resumed build must match them)."""
        skip = {"overwrite", "show_progress", "device", "batch_size", "fusion", "k_rrf", "alpha"}
        return {"kind": kind, **{k: v for k, v in dataclasses.asdict(self).items() if k not in skip}}


# ------------------------------------------------------------------------------ building
def _prepare_tmp(tmp: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Resume ``tmp`` when its recorded state matches, else start it afresh; returns the progress."""
    sfile = tmp / BUILD_STATE
    if tmp.exists():
        if not sfile.is_file() and any(tmp.iterdir()):
            raise ConfigError(f"{tmp} exists and is not an interrupted searchrl build; remove it first")
        try:
            old = json.loads(sfile.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("key") == state:
            logger.info("resuming the interrupted build in %s (done: %s)", tmp, ", ".join(old["done"]) or "-")
            old["resumed"] = True
            return old
        logger.warning("discarding %s: it was built from another corpus or with other settings", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    progress = {"key": state, "done": []}
    sfile.write_text(json.dumps(progress, indent=2))
    return progress


def _mark_done(tmp: Path, progress: dict[str, Any], step: str, **info: Any) -> None:
    progress["done"].append(step)
    progress.setdefault("info", {})[step] = info
    (tmp / BUILD_STATE).write_text(json.dumps(progress, indent=2))


def _build_dense(tmp: Path, store: PassageStore, o: BuildOptions) -> dict[str, Any]:
    from searchrl.retrieval.dense import DenseRetriever, Encoder, build_faiss, encode_shards
    from searchrl.retrieval.faiss_index import VECTORS_FILE, write_vectors

    encoder = Encoder(
        o.model, pooling=o.pooling, normalize=o.normalize, query_prefix=o.query_prefix,
        passage_prefix=o.passage_prefix, max_length=o.max_length, batch_size=o.batch_size,
        device=o.device, dtype=o.dtype, show_progress=o.show_progress,
    )
    emb_dir = tmp / "dense" / "emb"
    shards = encode_shards(encoder, store, emb_dir, o.shard_size, show_progress=o.show_progress)
    index, info = build_faiss(
        shards, encoder.dim, o.faiss, hnsw_m=o.hnsw_m, nlist=o.nlist, pq_m=o.pq_m, pq_bits=o.pq_bits,
        sq=o.sq, train_size=o.train_size, show_progress=o.show_progress,
    )
    vectors = None
    if o.refine:
        info.update(write_vectors(shards, tmp / "dense" / VECTORS_FILE, o.refine))
        vectors = np.load(tmp / "dense" / VECTORS_FILE, mmap_mode="r")
    DenseRetriever(encoder, index, store, info, vectors=vectors).save(tmp / "dense")
    shutil.rmtree(emb_dir)
    return {"dir": "dense", "model": encoder.describe(), "faiss": info}


def build_index(corpus_path: str | Path, kind: str, out_dir: str | Path, **opts: Any) -> Path:
    """Build a ``kind`` index (bm25 | dense | hybrid) of the corpus file into ``out_dir``.

    ``opts`` are :class:`BuildOptions` fields. Re-running an interrupted build resumes it.
    """
    from searchrl.data.corpus import corpus_fingerprint, iter_corpus

    o = BuildOptions.from_kwargs(opts)
    if kind not in KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; valid: {', '.join(KINDS)}")
    corpus_path, out = Path(corpus_path), Path(out_dir)
    if not corpus_path.is_file():
        raise DataFormatError(str(corpus_path), None, "corpus file not found")
    if out.exists() and not o.overwrite:
        raise ConfigError(f"{out} already exists; choose another directory or overwrite it")
    t0 = time.time()
    fingerprint = corpus_fingerprint(corpus_path)
    tmp = out.with_name(out.name + ".tmp")
    progress = _prepare_tmp(tmp, {"corpus": fingerprint, **o.state_key(kind)})
    if "passages" not in progress["done"]:
        stats = write_passages(iter_corpus(corpus_path, progress=None if o.show_progress else False), tmp)
        if stats["count"] == 0:
            raise DataFormatError(str(corpus_path), None, "the corpus has no passages")
        _mark_done(tmp, progress, "passages", **stats)
    stats = progress["info"]["passages"]
    store = PassageStore(tmp)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "searchrl_version": searchrl.__version__,
        "corpus": {"path": str(corpus_path.resolve()), "fingerprint": fingerprint},
        "num_passages": stats["count"],
        "passages": {"file": PASSAGES, "bytes": stats["bytes"], "sha256": stats["sha256"]},
    }
    if kind in ("bm25", "hybrid"):
        if "bm25" not in progress["done"]:
            from searchrl.retrieval.bm25 import BM25Retriever

            bm25 = BM25Retriever.build(
                store, stemmer=o.stemmer, stopwords=o.stopwords, k1=o.k1, b=o.b, show_progress=o.show_progress
            )
            bm25.save(tmp / "bm25")
            _mark_done(tmp, progress, "bm25", **bm25.describe())
        manifest["bm25"] = {"dir": "bm25", **progress["info"]["bm25"]}
    if kind in ("dense", "hybrid"):
        if "dense" not in progress["done"]:
            _mark_done(tmp, progress, "dense", **_build_dense(tmp, store, o))
        manifest["dense"] = progress["info"]["dense"]
    if kind == "hybrid":
        manifest["hybrid"] = {"fusion": o.fusion, "k_rrf": o.k_rrf, "alpha": o.alpha, "pool": None}
    store.close()
    manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["build_seconds"] = round(time.time() - t0, 2)
    manifest["resumed"] = bool(progress.get("resumed", False))
    (tmp / BUILD_STATE).unlink()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _swap_into_place(tmp, out)
    logger.info("built %s index of %d passages in %s (%.1fs)", kind, stats["count"], out, time.time() - t0)
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# ------------------------------------------------------------------------------ loading
def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The validated manifest of an index directory (raises IndexFormatError)."""
    d = Path(directory)
    if not d.is_dir():
        hint = ""
        if Path(f"{d}.tmp").is_dir():
            hint = f" (an interrupted build is in {d}.tmp: rerun the same `searchrl index` to finish it)"
        raise IndexFormatError(f"index directory {d} does not exist{hint}")
    path = d / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{d} is not a searchrl index: {MANIFEST} is missing")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(m, dict):
        raise IndexFormatError(f"{path}: expected a JSON object")
    version = m.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format_version {version!r} is not supported (this searchrl reads <= {FORMAT_VERSION})"
        )
    kind = m.get("kind")
    if kind not in KINDS:
        raise IndexFormatError(f"{path}: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    required = ["num_passages", "passages"] + [s for s in ("bm25", "dense") if kind in (s, "hybrid")]
    for field in required:
        if field not in m:
            raise IndexFormatError(f"{path}: field {field!r} is missing (needed for a {kind} index)")
    if not isinstance(m["num_passages"], int) or m["num_passages"] < 1:
        raise IndexFormatError(f"{path}: num_passages must be a positive integer")
    for section in ("passages", "bm25", "dense", "hybrid"):
        value = m.get(section)
        if section in m and not (isinstance(value, dict) and isinstance(value.get("dir", ""), str)):
            raise IndexFormatError(f"{path}: {section!r} must be an object (with a string 'dir'), got {value!r}")
    return m


def open_passages(directory: str | Path, manifest: dict[str, Any], verify: bool = False) -> PassageStore:
    d = Path(directory)
    store = PassageStore(d)
    if len(store) != manifest["num_passages"]:
        raise IndexFormatError(
            f"{d / PASSAGES} holds {len(store)} passages but {MANIFEST} says {manifest['num_passages']}"
        )
    expected = manifest["passages"].get("bytes")
    if expected is not None and int(store.offsets[-1]) != expected:
        size = int(store.offsets[-1])
        raise IndexFormatError(f"{d / PASSAGES} has {size} bytes, {MANIFEST} says {expected}")
    store[0], store[len(store) - 1]  # noqa: B018 - parse the ends: catches a wrong or garbled file
    if verify and store.sha256() != manifest["passages"].get("sha256"):
        raise IndexFormatError(f"{d / PASSAGES}: checksum differs from {MANIFEST}; the file was modified")
    return store


def index_fingerprint(directory: str | Path, **search_settings: Any) -> str:
    """``sha256:...`` of the manifest (corpus, passages checksum, build settings, creation time)
    and of the query-time settings that change results (``nprobe``, ``alpha``...; None = recorded)."""
    d = Path(directory)
    digest = hashlib.sha256((d / MANIFEST).read_bytes())
    settings = {k: v for k, v in sorted(search_settings.items()) if v is not None}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()


def _of_kind(m: dict[str, Any], sparse: Any, dense: Any, fusion: str | None, alpha: float | None) -> Any:
    """The manifest's kind of retriever over the loaded parts (hybrid: fused as recorded unless set)."""
    if m["kind"] == "bm25":
        return sparse
    if m["kind"] == "dense":
        return dense
    from searchrl.retrieval.hybrid import HybridRetriever

    h = m.get("hybrid", {})
    return HybridRetriever(
        sparse, dense, fusion=fusion or h.get("fusion", "rrf"), k_rrf=h.get("k_rrf", 60.0),
        alpha=h.get("alpha", 0.5) if alpha is None else alpha, pool=h.get("pool"),
    )


def load_index(
    directory: str | Path,
    *,
    model: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    ef_search: int | None = None,
    nprobe: int | None = None,
    refine_factor: int | None = None,
    fusion: str | None = None,
    alpha: float | None = None,
    mmap: bool = False,
    mmap_bm25: bool = False,
    verify: bool = False,
    cache: str | Path | None = None,
) -> Retriever:
    """Load an index directory as a Retriever (BM25Retriever, DenseRetriever or HybridRetriever).

    ``model`` overrides the embedding model's recorded path (e.g. the index was moved to another
    machine); ``verify`` checks the passages file's checksum (reads it whole); ``mmap`` maps the
    BM25 arrays and the FAISS index from disk instead of reading them (``mmap_bm25``: BM25 only).
    ``cache`` wraps the result in a :class:`~searchrl.retrieval.cache.CachedRetriever` recording
    to (and replaying from) that SQLite file. The retriever's ``fingerprint`` attribute identifies
    the index and the query-time settings.
    """
    d = Path(directory)
    m = read_manifest(d)
    store = open_passages(d, m, verify=verify)
    sparse = dense = None
    if "bm25" in m and m["kind"] in ("bm25", "hybrid"):
        from searchrl.retrieval.bm25 import BM25Retriever

        sparse = BM25Retriever.load(d / m["bm25"].get("dir", "bm25"), store, mmap=mmap or mmap_bm25)
    if "dense" in m and m["kind"] in ("dense", "hybrid"):
        from searchrl.retrieval.dense import DenseRetriever

        dense = DenseRetriever.load(
            d / m["dense"].get("dir", "dense"), store, model=model, device=device, batch_size=batch_size,
            ef_search=ef_search, nprobe=nprobe, refine_factor=refine_factor, mmap=mmap,
        )  # fmt: skip
        want = m["dense"].get("model", {}).get("dim")
        if want != dense.index.d:
            raise IndexFormatError(
                f"{d / MANIFEST}: dense dim {want} but the FAISS index has dim {dense.index.d}"
            )
    retriever = _of_kind(m, sparse, dense, fusion, alpha)
    retriever.fingerprint = index_fingerprint(
        d, ef_search=ef_search, nprobe=nprobe, refine_factor=refine_factor, fusion=fusion, alpha=alpha
    )
    if cache is not None:
        from searchrl.retrieval.cache import CachedRetriever

        return CachedRetriever(retriever, cache)
    return retriever
