"""Read and write passage corpora, and the record-file plumbing shared with the QA loader.

Corpus formats, detected from the content (not the file name):

- Search-R1 / FlashRAG JSON lines ``{"id", "contents"}`` where ``contents`` is ``"Title"\\ntext``;
- JSON lines ``{"id", "title", "text"}`` (``id`` optional: the 0-based record index is used);
- HippoRAG JSON: a list of ``{"title", "text"}`` objects, or one object mapping a title to its list
  of sentences;
- any of the record shapes above in a JSON list or a parquet file.

Files may be gzip-compressed (``.gz``). Ids become strings and must be unique. Malformed input raises
:class:`~searchrl.errors.DataFormatError` with the file, the line (or record) number and the reason;
nothing is skipped silently (blank lines are not records). Also here: :func:`corpus_fingerprint`
(a cheap, stable identity for index manifests) and :func:`write_corpus_jsonl`.

Left out: tokenisation, chunking long documents into 100-word passages, and remote corpora.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from searchrl.errors import DataFormatError
from searchrl.types import Passage

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

CORPUS_FORMATS = (
    'JSON lines {"id", "contents": "\\"Title\\"\\ntext"} (Search-R1 / FlashRAG)',
    'JSON lines {"id"?, "title", "text"}',
    'JSON list of {"title", "text"} (HippoRAG)',
    "JSON object title -> [sentences] (HippoRAG)",
)

_PROGRESS_MIN_BYTES = 64 << 20  # show a progress bar for files larger than this
_FULL_HASH_MAX_BYTES = 64 << 20  # fingerprint hashes smaller files whole
_BLOCK = 1 << 20


# ----------------------------------------------------------------------------- record plumbing


def data_error(path: PathLike, unit: str, n: int | None, reason: str) -> DataFormatError:
    """A :class:`DataFormatError` located at line ``n`` (``path:n: ...``) or record ``n``.

    Records (JSON list items, parquet rows) have no line, so the message says ``record n``;
    ``.line`` holds ``n`` either way.
    """
    if unit == "line" or n is None:
        return DataFormatError(str(path), n, reason)
    err = DataFormatError(str(path), None, f"record {n}: {reason}")
    err.line = n
    return err


def open_binary(path: PathLike) -> IO[bytes]:
    """Open a file for reading bytes, transparently un-gzipping ``*.gz``."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(str(path), None, "no such file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _data_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def read_records(path: PathLike, progress: bool | None = None) -> tuple[str, Iterator[tuple[int, Any]]]:
    """Read a JSON-lines, JSON or parquet file as ``(n, value)`` pairs, ``n`` 1-based.

    Returns ``(unit, iterator)`` where ``unit`` is ``"line"`` for JSON lines (``n`` is the line
    number; blank lines are skipped) and ``"record"`` for a JSON list, a single JSON object
    (yielded as record 1) or parquet rows. Bad JSON raises :class:`DataFormatError`.
    ``progress=None`` shows a bar only for files over 64 MiB.
    """
    path = Path(path)
    if _data_suffix(path) == ".parquet":
        return "record", _iter_parquet(path)
    with open_binary(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    if not head:
        raise DataFormatError(str(path), None, "empty file")
    first = head[:1]
    if first == b"[":
        return "record", _iter_json_whole(path)
    if first != b"{":
        raise DataFormatError(
            str(path), 1, f"not JSON, JSON lines or parquet (starts with {first.decode(errors='replace')!r})"
        )
    try:  # a JSON-lines file has a complete object on its first line
        with open_binary(path) as f:
            json.loads(next(line for line in f if line.strip()))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "record", _iter_json_whole(path)  # one (pretty-printed) JSON object
    return "line", _iter_jsonl(path, progress)


def _iter_json_whole(path: Path) -> Iterator[tuple[int, Any]]:
    with open_binary(path) as f:
        raw = f.read()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataFormatError(str(path), e.lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(str(path), None, f"not UTF-8 text: {e.reason}") from None
    if isinstance(value, list):
        yield from enumerate(value, start=1)
    else:
        yield 1, value


def _iter_jsonl(path: Path, progress: bool | None) -> Iterator[tuple[int, Any]]:
    from tqdm.auto import tqdm

    size = path.stat().st_size
    show = size > _PROGRESS_MIN_BYTES if progress is None else progress
    total = None if path.suffix == ".gz" else size
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not show)
    pending = 0
    with open_binary(path) as f, bar:
        for lineno, line in enumerate(f, start=1):
            pending += len(line)
            if pending > _BLOCK:
                bar.update(pending)
                pending = 0
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(str(path), lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
            except UnicodeDecodeError as e:
                raise DataFormatError(str(path), lineno, f"not UTF-8 text: {e.reason}") from None
            yield lineno, value
        bar.update(pending)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataFormatError(str(path), None, f"not a readable parquet file: {e}") from None
    if pfile.metadata.num_rows == 0:
        raise DataFormatError(str(path), None, "empty file (parquet with no rows)")
    n = 0
    for batch in pfile.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def literal(value: Any) -> Any:
    """Undo a common export bug: a list, dict or bool saved as its Python/JSON text.

    >>> literal("[['Paris', ['Capital.']]]")
    [['Paris', ['Capital.']]]
    >>> literal("True"), literal("plain text"), literal(3)
    (True, 'plain text', 3)
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    if text[:1] in ("[", "{") and text[-1:] in ("]", "}"):
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
    return value


def join_sentences(sentences: Iterable[str]) -> str:
    """Join sentences into one passage, adding a space only where neither side has one.

    HotpotQA keeps the leading space of each sentence, 2WikiMultiHopQA does not; both come out
    as normal prose.

    >>> join_sentences(["A b.", " C d.", "E f."])
    'A b. C d. E f.'
    """
    out = ""
    for s in sentences:
        if out and s and not out[-1].isspace() and not s[0].isspace():
            out += " "
        out += s
    return out.strip()


def check_str(
    path: PathLike, unit: str, n: int, row: dict, key: str, required: bool = True, allow_int: bool = False
) -> str:
    """``row[key]`` as a string (ints too when ``allow_int``, as for ids), or a located error."""
    if key not in row or row[key] is None:
        if required:
            raise data_error(path, unit, n, f"field {key!r} missing")
        return ""
    value = row[key]
    if not isinstance(value, str) and not (allow_int and isinstance(value, int) and not isinstance(value, bool)):
        raise data_error(path, unit, n, f"field {key!r} must be a string, got {type(value).__name__}")
    return str(value)


# ----------------------------------------------------------------------------- corpus


def _row_passage(path: Path, unit: str, n: int, row: Any, index: int) -> Passage:
    if not isinstance(row, dict):
        raise data_error(path, unit, n, f"expected a JSON object, got {type(row).__name__}")
    pid = check_str(path, unit, n, row, "id", required=False, allow_int=True) or str(index)
    if "contents" in row:
        return Passage.from_contents(pid, check_str(path, unit, n, row, "contents"))
    if "text" in row:
        text = row["text"]
        if isinstance(text, list) and all(isinstance(s, str) for s in text):
            text = join_sentences(text)
        elif not isinstance(text, str):
            raise data_error(path, unit, n, f"field 'text' must be a string, got {type(text).__name__}")
        title = check_str(path, unit, n, row, "title", required=False)
        return Passage(pid, title, text)
    raise data_error(
        path, unit, n, "field 'contents' (Search-R1 / FlashRAG) or 'text' (with optional 'title') missing"
    )


def _is_title_mapping(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in value.values())
    )


def iter_corpus(path: PathLike, progress: bool | None = None, check_ids: bool = True) -> Iterator[Passage]:
    """Stream the passages of a corpus file (any format in :data:`CORPUS_FORMATS`).

    ``check_ids`` keeps every id seen so far to reject duplicates (turn it off only for corpora
    too large for that dict and known to be clean). ``progress=None`` shows a bar for big files.
    """
    path = Path(path)
    unit, records = read_records(path, progress)
    seen: dict[str, int] = {}
    index = -1
    for n, row in records:
        index += 1
        if index == 0 and _is_title_mapping(row):
            yield from _iter_title_mapping(path, unit, row, records)
            return
        passage = _row_passage(path, unit, n, row, index)
        if check_ids:
            if passage.id in seen:
                where = f"{unit} {seen[passage.id]}"
                raise data_error(path, unit, n, f"duplicate id {passage.id!r} (first seen at {where})")
            seen[passage.id] = n
        yield passage
    if index < 0:
        raise DataFormatError(str(path), None, "empty file: no passages")


def _iter_title_mapping(path: Path, unit: str, mapping: dict, rest: Iterator) -> Iterator[Passage]:
    for n, _ in rest:
        raise data_error(path, unit, n, "a title -> sentences object must be the only JSON value")
    for i, (title, sentences) in enumerate(mapping.items()):
        yield Passage(str(i), title, join_sentences(sentences))


def load_corpus(path: PathLike, progress: bool | None = None) -> list[Passage]:
    """All passages of a corpus file, in file order (see :func:`iter_corpus`)."""
    passages = list(iter_corpus(path, progress=progress))
    logger.info("loaded %d passages from %s", len(passages), path)
    return passages


def write_corpus_jsonl(passages: Iterable[Passage], path: PathLike) -> int:
    """Write passages as Search-R1 JSON lines ``{"id", "contents"}`` (gzip if ``*.gz``).

    Written atomically (temporary file, then rename). Returns the number of passages. Raises
    ``ValueError`` for duplicate ids or titles with a newline (they would not read back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    seen: set[str] = set()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(tmp, "wt", encoding="utf-8") as f:
            for p in passages:
                if p.id in seen:
                    raise ValueError(f"duplicate passage id {p.id!r}")
                if "\n" in p.title:
                    raise ValueError(f"passage {p.id!r}: title contains a newline")
                seen.add(p.id)
                f.write(json.dumps({"id": p.id, "contents": p.contents}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(seen)


def corpus_fingerprint(path: PathLike, full: bool | None = None) -> str:
    """A stable identity of a corpus file's bytes, for index manifests: ``"sha256:<hex>"``.

    Files up to 64 MiB are hashed whole. Larger ones (wiki-18 is 14 GB) hash their size, the first
    and last MiB and 16 evenly spaced 64 KiB blocks, which is O(1) and catches truncation,
    appends, re-orderings and other re-exports, but not a one-byte edit in an unsampled block;
    ``full=True`` forces the whole-file hash. Copies and renames keep the fingerprint.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(str(path), None, "no such file")
    size = path.stat().st_size
    whole = size <= _FULL_HASH_MAX_BYTES if full is None else full
    h = hashlib.sha256(f"searchrl-corpus-v1 size={size} whole={whole}\n".encode())
    with open(path, "rb") as f:
        if whole:
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
        else:
            step = 64 << 10
            offsets = [0] + [(size - step) * i // 17 for i in range(1, 17)] + [size - _BLOCK]
            for offset in offsets:
                f.seek(offset)
                h.update(f.read(_BLOCK if offset in (0, size - _BLOCK) else step))
    return "sha256:" + h.hexdigest()
