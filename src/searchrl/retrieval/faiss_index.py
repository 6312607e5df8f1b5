"""FAISS indexes for dense retrieval: build from embedding shards, tune at query time, memory-map.

Index types (all inner product, ``--faiss`` on ``searchrl index``):

- ``flat``: exact search over float32 vectors (4 * dim bytes a vector).
- ``hnsw``: HNSW graph over float32 vectors.
- ``ivf``: inverted lists of float32 vectors (``nlist`` k-means cells, ``nprobe`` searched).
- ``ivfpq``: inverted lists of product-quantised codes (``pq_m`` bytes a vector at 8 bits).
- ``opq``: ``ivfpq`` after a learned rotation (OPQ), which lowers the quantisation error.
- ``hnswsq``: HNSW graph over scalar-quantised vectors (``sq8``: dim bytes, ``sq4``: dim / 2).

Codebooks (coarse k-means, PQ, OPQ, SQ ranges) are trained on a random sample of the shards.
The compressed types can keep a copy of every vector as float16 in ``vectors.npy`` (``refine``):
search then fetches ``refine_factor * k`` candidates and re-scores them exactly against that
memory-mapped file, so RAM holds the codes while the disk holds the vectors.

Loading with ``mmap=True`` maps the index file instead of reading it: the inverted lists of IVF
types (``IO_FLAG_MMAP``) and the codes of flat / HNSW types (``IO_FLAG_MMAP_IFC``; the HNSW graph
itself is always read into RAM by this FAISS). Start-up is then the time to map the file, and
resident memory grows with the lists and rows that searches touch.

Left out: GPU FAISS, sharding an index over several machines, and on-disk inverted lists built
without the whole index in memory (a 21M-passage IVF-PQ build needs its codes, ~2 GB, in RAM).
"""

from __future__ import annotations

import logging
import math
import mmap as mmap_module
from pathlib import Path
from typing import Any

import numpy as np

from searchrl.errors import ConfigError

logger = logging.getLogger(__name__)

FAISS_TYPES = ("flat", "hnsw", "ivf", "ivfpq", "opq", "hnswsq")
IVF_TYPES = ("ivf", "ivfpq", "opq")
HNSW_TYPES = ("hnsw", "hnswsq")
COMPRESSED_TYPES = ("ivfpq", "opq", "hnswsq")
SQ_TYPES = {"sq8": "SQ8", "sq4": "SQ4", "fp16": "SQfp16"}
VECTORS_FILE = "vectors.npy"


def default_nlist(n: int) -> int:
    """IVF list count: about 4*sqrt(n), but at least 39 training points per list (FAISS's minimum).

    >>> default_nlist(25_000), default_nlist(30), default_nlist(21_000_000)
    (632, 1, 18330)
    """
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def default_pq_m(dim: int) -> int:
    """PQ sub-quantisers: one per 8 dimensions (96 bytes a vector for 768-d e5-base).

    >>> default_pq_m(768), default_pq_m(384), default_pq_m(30)
    (96, 48, 30)
    """
    return dim // 8 if dim % 8 == 0 else dim


def default_train_size(n: int, nlist: int, pq_bits: int = 8) -> int:
    """Training sample: 64 points per IVF cell and per PQ centroid, at most 1M, at most ``n``."""
    return int(min(n, 1_000_000, max(64 * nlist, 64 * 2**pq_bits, 10_000)))


def _training_sample(shards: list[Path], n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(size, n), replace=False))  # global row numbers
    parts, offset = [], 0
    for path in shards:
        arr = np.load(path, mmap_mode="r")
        sel = rows[(rows >= offset) & (rows < offset + arr.shape[0])] - offset
        parts.append(np.asarray(arr[sel], dtype=np.float32))
        offset += arr.shape[0]
    return np.ascontiguousarray(np.concatenate(parts))


def _factory_string(faiss_type: str, dim: int, n: int, o: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """FAISS ``index_factory`` description and the settings recorded in the manifest."""
    if faiss_type == "flat":
        return "Flat", {}
    if faiss_type in HNSW_TYPES:
        m = int(o.get("hnsw_m") or 32)
        info = {"M": m, "ef_construction": int(o.get("ef_construction") or 200), "ef_search": 128}
        if faiss_type == "hnsw":
            return f"HNSW{m},Flat", info
        sq = o.get("sq") or "sq8"
        if sq not in SQ_TYPES:
            raise ConfigError(f"sq must be one of {', '.join(SQ_TYPES)}, got {sq!r}")
        return f"HNSW{m},{SQ_TYPES[sq]}", {**info, "sq": sq}
    nlist = int(o.get("nlist") or default_nlist(n))
    info = {"nlist": nlist, "nprobe": min(nlist, 64 if faiss_type != "ivf" else 32)}
    if faiss_type == "ivf":
        return f"IVF{nlist},Flat", info
    pq_m = int(o.get("pq_m") or default_pq_m(dim))
    if pq_m < 1 or dim % pq_m:
        raise ConfigError(f"pq_m must divide the embedding dimension {dim}, got {pq_m}")
    train = int(o.get("train_size") or default_train_size(n, nlist, int(o.get("pq_bits") or 8)))
    bits = int(o.get("pq_bits") or 8)
    if not 1 <= bits <= 16:
        raise ConfigError(f"pq_bits must be in 1..16, got {bits}")
    bits = max(1, min(bits, int(math.log2(max(train, 2)))))  # a tiny corpus cannot train 256 centroids
    if faiss_type == "opq" and train < 256:
        raise ConfigError(f"opq trains 256 centroids per sub-space: it needs >= 256 vectors, got {train}")
    info.update(pq_m=pq_m, pq_bits=bits, train_size=train)
    pq = f"IVF{nlist},PQ{pq_m}x{bits}np"  # np: no polysemous training (slow, unused here)
    return (f"OPQ{pq_m},{pq}" if faiss_type == "opq" else pq), info


def build_faiss(
    shards: list[Path],
    dim: int,
    faiss_type: str = "flat",
    *,
    hnsw_m: int = 32,
    ef_construction: int = 200,
    nlist: int | None = None,
    pq_m: int | None = None,
    pq_bits: int = 8,
    sq: str = "sq8",
    train_size: int | None = None,
    opq_niter: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Inner-product FAISS index over the embedding shards; returns the index and its settings.

    ``opq_niter`` overrides FAISS's 50 OPQ iterations (each trains a PQ: fewer is faster, coarser).
    """
    import faiss
    from tqdm.auto import tqdm

    if faiss_type not in FAISS_TYPES:
        raise ConfigError(f"faiss type must be one of {', '.join(FAISS_TYPES)}, got {faiss_type!r}")
    n = sum(int(np.load(p, mmap_mode="r").shape[0]) for p in shards)
    opts = dict(hnsw_m=hnsw_m, ef_construction=ef_construction, nlist=nlist, pq_m=pq_m, pq_bits=pq_bits,
                sq=sq, train_size=train_size)  # fmt: skip
    spec, extra = _factory_string(faiss_type, dim, n, opts)
    info: dict[str, Any] = {"type": faiss_type, "metric": "inner_product", "factory": spec, **extra}
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if faiss_type in HNSW_TYPES:
        faiss.downcast_index(index).hnsw.efConstruction = int(info["ef_construction"])
    if faiss_type == "opq" and opq_niter:
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = int(opq_niter)
        info["opq_niter"] = int(opq_niter)
    if not index.is_trained:
        size = int(info.get("train_size") or default_train_size(n, int(info.get("nlist", 1))))
        sample = _training_sample(shards, n, size, seed)  # (m, dim)
        logger.info("training FAISS %s on %d vectors", spec, sample.shape[0])
        index.train(sample)
        info["train_size"] = int(sample.shape[0])
    with tqdm(total=n, desc=f"Adding to FAISS {faiss_type}", unit="vec", disable=not show_progress) as bar:
        for path in shards:
            arr = np.ascontiguousarray(np.load(path), dtype=np.float32)  # (rows, dim)
            index.add(arr)
            bar.update(arr.shape[0])
    return index, info


def write_vectors(shards: list[Path], path: Path, dtype: str = "float16") -> dict[str, Any]:
    """All shard rows in one ``.npy`` of ``dtype`` (written shard by shard): the refine copy."""
    n = sum(int(np.load(p, mmap_mode="r").shape[0]) for p in shards)
    dim = int(np.load(shards[0], mmap_mode="r").shape[1])
    tmp = path.with_name(path.name + ".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
    row = 0
    for p in shards:
        arr = np.load(p, mmap_mode="r")
        out[row : row + arr.shape[0]] = arr
        row += arr.shape[0]
    out.flush()
    del out
    tmp.replace(path)
    return {"refine": dtype, "refine_factor": 10}


def open_vectors(path: Path) -> np.ndarray:
    """The refine copy, memory-mapped for random access (no read-ahead of neighbouring rows)."""
    vectors = np.load(path, mmap_mode="r")
    raw = getattr(vectors, "_mmap", None)
    if raw is not None and hasattr(raw, "madvise") and hasattr(mmap_module, "MADV_RANDOM"):
        raw.madvise(mmap_module.MADV_RANDOM)  # rows are read one by one, scattered over the file
    return vectors


def mmap_flags(faiss_type: str) -> int:
    """``read_index`` flags that map ``faiss_type``'s bulk data instead of reading it."""
    import faiss

    return faiss.IO_FLAG_MMAP if faiss_type in IVF_TYPES else faiss.IO_FLAG_MMAP_IFC


def read_faiss(path: Path, faiss_type: str, mmap: bool = False) -> Any:
    import faiss

    return faiss.read_index(str(path), mmap_flags(faiss_type) if mmap else 0)


def set_search_params(index: Any, info: dict[str, Any], ef_search: int | None, nprobe: int | None) -> None:
    """Apply ``efSearch`` (HNSW types) or ``nprobe`` (IVF types); None keeps the recorded value."""
    import faiss

    kind = info.get("type")
    if kind in HNSW_TYPES:
        faiss.downcast_index(index).hnsw.efSearch = int(ef_search or info.get("ef_search", 128))
    elif kind in IVF_TYPES:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(int(nprobe or info.get("nprobe", 32)), int(ivf.nlist))


def refine_search(
    index: Any, vectors: np.ndarray, q: np.ndarray, k: int, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of ``factor * k`` index candidates re-scored against ``vectors`` (exact dot products).

    Returns ``(scores, ids)`` of shape (nq, k) like ``index.search`` (id -1 pads missing results);
    ties are broken by the lower row number.
    """
    kk = min(max(k, k * factor), index.ntotal)
    _, cand = index.search(q, kk)  # (nq, kk)
    uniq = np.unique(cand[cand >= 0])  # sorted rows: one read per touched vector
    rows = np.asarray(vectors[uniq], dtype=np.float32)  # (u, dim)
    exact = q @ rows.T  # (nq, u)
    scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    ids = np.full((q.shape[0], k), -1, dtype=np.int64)
    for i, row in enumerate(cand):
        row = np.unique(row[row >= 0])
        s = exact[i, np.searchsorted(uniq, row)]
        order = np.lexsort((row, -s))[:k]
        scores[i, : order.size], ids[i, : order.size] = s[order], row[order]
    return scores, ids
