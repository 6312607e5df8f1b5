"""Property-based tests (hypothesis) of every loader: corpus, QA formats, YAML config, index folder.

Each loader gets arbitrary bytes, random JSON records, truncated valid files, non-UTF-8 bytes and
huge fields. The only outcomes allowed: a result that holds every record of the file (no silent
skip), or the loader's own error (:class:`DataFormatError` / :class:`ConfigError` /
:class:`IndexFormatError`) naming the file, with a line or record number where the input has lines.
Anything else (a traceback) fails. Example counts are bounded so the file runs in seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from searchrl.data.corpus import load_corpus
from searchrl.data.qa import load_qa
from searchrl.errors import ConfigError, DataFormatError, IndexFormatError, SearchRLError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
json_value = st.recursive(json_scalar, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
# records that look like the real formats, with fields of any type
field_names = st.sampled_from(["id", "contents", "title", "text", "question", "golden_answers", "answer",
                               "answers", "prompt", "reward_model", "context", "supporting_facts", "paragraphs",
                               "question_decomposition", "split", "data_source", "extra_info", "_id"])
record = st.dictionaries(field_names, json_value, min_size=1, max_size=5)


_SCRATCH: list[Path] = []  # this module's scratch root, set by _scratch_root


@pytest.fixture(scope="module", autouse=True)
def _scratch_root(tmp_path_factory):
    """One folder for every example's files (hypothesis forbids function-scoped tmp_path), under
    pytest's own temporary root, which it prunes: examples used to leave a mkdtemp folder each in /tmp."""
    _SCRATCH[:] = [tmp_path_factory.mktemp("fuzz")]
    yield
    _SCRATCH.clear()


def _scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH[0]))


def _tmpfile(data: bytes, name: str) -> Path:
    d = _scratch("file-")
    path = d / name
    path.write_bytes(data)
    return path


def _jsonl(rows: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _records_in(path: Path) -> int:
    """Non-blank lines of a JSON-lines file (what a successful load must account for)."""
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())


def _check_error(err: SearchRLError, path: Path) -> None:
    assert str(path) in str(err), f"error does not name the file: {err}"
    if isinstance(err, DataFormatError):
        assert err.path == str(path)


def _load_corpus_or_error(path: Path, jsonl: bool = False):
    try:
        passages = load_corpus(path, progress=False)
    except DataFormatError as e:
        _check_error(e, path)
        return None
    if jsonl:
        assert len(passages) >= _records_in(path), "records were skipped silently"
    assert all(isinstance(p.id, str) and isinstance(p.text, str) for p in passages)
    return passages


def _load_qa_or_error(path: Path, jsonl: bool = False):
    try:
        examples = load_qa(path)
    except DataFormatError as e:
        _check_error(e, path)
        return None
    if jsonl:
        assert len(examples) == _records_in(path), "records were skipped silently"
    assert all(isinstance(e.question, str) and all(isinstance(a, str) for a in e.golden_answers)
               for e in examples)
    return examples


# --------------------------------------------------------------------------------- corpus and QA
@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".jsonl", ".json", ".parquet", ".txt"]))
def test_arbitrary_bytes(data, suffix):
    _load_corpus_or_error(_tmpfile(data, "corpus" + suffix))
    _load_qa_or_error(_tmpfile(data, "nq_test" + suffix))


@FUZZ
@given(rows=st.lists(record | json_value, min_size=1, max_size=6))
def test_random_json_lines_records(rows):
    raw = _jsonl(rows)
    path = _tmpfile(raw, "corpus.jsonl")
    first_is_obj = raw.lstrip().startswith(b"{")
    _load_corpus_or_error(path, jsonl=first_is_obj)
    _load_qa_or_error(_tmpfile(raw, "hotpotqa_train.jsonl"), jsonl=first_is_obj)


@FUZZ
@given(rows=st.lists(record, min_size=1, max_size=6))
def test_random_json_list_and_parquet_free_form(rows):
    raw = json.dumps(rows).encode()
    _load_corpus_or_error(_tmpfile(raw, "corpus.json"))
    _load_qa_or_error(_tmpfile(raw, "musique_dev.json"))


VALID_CORPUS = _jsonl([{"id": str(i), "contents": f'"T{i}"\ntext {i} ' + "é" * i} for i in range(6)])
VALID_QA = _jsonl([{"id": f"q{i}", "question": f"who {i}?", "golden_answers": [f"a{i}"]} for i in range(6)])


@FUZZ
@given(cut=st.integers(1, len(VALID_CORPUS) - 1), which=st.sampled_from(["corpus", "qa"]))
def test_truncated_valid_file(cut, which):
    raw = (VALID_CORPUS if which == "corpus" else VALID_QA)[:cut]
    path = _tmpfile(raw, "corpus.jsonl" if which == "corpus" else "nq_test.jsonl")
    loaded = _load_corpus_or_error(path, True) if which == "corpus" else _load_qa_or_error(path, True)
    whole_lines = raw.count(b"\n")
    if loaded is None:
        return
    assert len(loaded) in (whole_lines, whole_lines + 1)  # a cut inside the last line cannot parse


@FUZZ
@given(pos=st.integers(0, len(VALID_QA) - 1), junk=st.binary(min_size=1, max_size=4).filter(
    lambda b: any(x >= 0x80 for x in b)))
def test_non_utf8_bytes_inside_a_valid_file(pos, junk):
    for valid, name, load in ((VALID_CORPUS, "corpus.jsonl", _load_corpus_or_error),
                              (VALID_QA, "nq_test.jsonl", _load_qa_or_error)):
        raw = valid[: min(pos, len(valid))] + junk + valid[min(pos, len(valid)):]
        path = _tmpfile(raw, name)
        try:
            raw.decode("utf-8")
            continue  # the junk happened to form valid UTF-8
        except UnicodeDecodeError:
            pass
        load(path, True)  # the error names the file, or every record loaded


def test_non_utf8_error_has_the_line():
    raw = VALID_QA.replace(b"who 3?", b"who \xff?")
    path = _tmpfile(raw, "nq_test.jsonl")
    with pytest.raises(DataFormatError) as e:
        load_qa(path)
    assert e.value.line == 4 and "UTF-8" in str(e.value)


@settings(max_examples=10, deadline=None)
@given(size=st.integers(1_000_000, 3_000_000), field=st.sampled_from(["contents", "id"]))
def test_huge_field(size, field):
    row = {"id": "x", "contents": '"T"\nshort'}
    row[field] = "w" * size
    passages = _load_corpus_or_error(_tmpfile(_jsonl([row, {"id": "y", "contents": "b"}]), "corpus.jsonl"), True)
    assert passages is not None and len(passages) == 2 and max(len(p.contents) for p in passages) >= 5


# --------------------------------------------------------------------------------- YAML config
yaml_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200)
config_keys = st.sampled_from(["steps", "out", "seed", "model", "model.name", "algo", "algo.name", "optim.lr",
                               "data", "data.train_files", "rollout.max_turns", "mode", "bogus"])


def _load_config_or_error(path: Path):
    from searchrl.config import load_yaml_config
    from searchrl.training.config import TrainConfig

    try:
        return load_yaml_config(TrainConfig, path)
    except ConfigError as e:
        _check_error(e, path)
        return None


@FUZZ
@given(data=st.binary(max_size=300) | yaml_text.map(str.encode))
def test_config_arbitrary_bytes(data):
    _load_config_or_error(_tmpfile(data, "cfg.yaml"))


@FUZZ
@given(entries=st.dictionaries(config_keys, json_value, min_size=1, max_size=4))
def test_config_wrong_types(entries):
    import yaml

    nested: dict = {}
    for key, value in entries.items():
        node = nested
        *head, last = key.split(".")
        for h in head:
            node = node.setdefault(h, {}) if isinstance(node.get(h, {}), dict) else {}
        node[last] = value
    _load_config_or_error(_tmpfile(yaml.safe_dump(nested).encode(), "cfg.yaml"))


def test_config_error_names_file_and_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("seed: 1\noptim:\n  lr: 0.001\n  warmup_steps: lots\n")
    with pytest.raises(ConfigError) as e:
        _load_yaml(path)
    assert str(path) in str(e.value) and ":4" in str(e.value) and "warmup_steps" in str(e.value)


def _load_yaml(path):
    from searchrl.config import load_yaml_config
    from searchrl.training.config import TrainConfig

    return load_yaml_config(TrainConfig, path)


# --------------------------------------------------------------------------------- index folder
@pytest.fixture(scope="module")
def bm25_index(tmp_path_factory):
    from searchrl.retrieval.index import build_index

    root = tmp_path_factory.mktemp("fuzz-index")
    (root / "corpus.jsonl").write_bytes(VALID_CORPUS)
    return build_index(root / "corpus.jsonl", "bm25", root / "index", show_progress=False)


def _copy_index(src: Path) -> Path:
    import shutil

    dst = _scratch("index-") / "index"
    shutil.copytree(src, dst)
    return dst


def _load_index_or_error(d: Path):
    from searchrl.retrieval.index import load_index

    try:
        r = load_index(d, verify=True)
        r.search(["text 3"], k=2)
        return r
    except (IndexFormatError, DataFormatError, ConfigError) as e:
        assert str(d) in str(e), f"error does not name the index: {e}"
        return None


@FUZZ
@given(data=st.binary(max_size=400) | json_value.map(lambda v: json.dumps(v).encode()))
def test_index_garbage_manifest(bm25_index, data):
    d = _copy_index(bm25_index)
    (d / "manifest.json").write_bytes(data)
    _load_index_or_error(d)


@FUZZ
@given(data=st.data())
def test_index_damaged_files(bm25_index, data):
    d = _copy_index(bm25_index)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != "manifest.json")
    target = data.draw(st.sampled_from(files), label="file")
    raw = target.read_bytes()
    how = data.draw(st.sampled_from(["truncate", "garbage", "empty", "delete"]), label="how")
    if how == "truncate":
        target.write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="cut")])
    elif how == "garbage":
        target.write_bytes(data.draw(st.binary(min_size=1, max_size=200), label="bytes"))
    elif how == "empty":
        target.write_bytes(b"")
    else:
        target.unlink()
    _load_index_or_error(d)


@pytest.mark.parametrize("payload", [b"5", b"[]", b"null", b'"x"', b"{}"])
def test_index_json_files_holding_the_wrong_json_type(bm25_index, payload):
    """Hypothesis found a BM25 params file holding a bare number: an AttributeError from bm25s's
    loader (and ours) instead of IndexFormatError. Every JSON file of the index, every wrong type."""
    names = sorted(p.relative_to(bm25_index) for p in bm25_index.rglob("*.json") if p.name != "manifest.json")
    assert names  # bm25s's params / vocab files and ours
    for name in names:
        d = _copy_index(bm25_index)
        (d / name).write_bytes(payload)
        _load_index_or_error(d)


@FUZZ
@given(key=st.sampled_from(["kind", "num_passages", "bm25", "passages", "format_version", "corpus"]),
       value=json_value)
def test_index_manifest_wrong_types(bm25_index, key, value):
    d = _copy_index(bm25_index)
    m = json.loads((d / "manifest.json").read_text())
    m[key] = value
    (d / "manifest.json").write_text(json.dumps(m))
    _load_index_or_error(d)


@pytest.mark.parametrize("key,value", [("bm25", None), ("bm25", []), ("bm25", {"dir": 5}), ("passages", "x"),
                                       ("passages", None)])
def test_index_manifest_section_of_the_wrong_type(bm25_index, key, value):
    d = _copy_index(bm25_index)
    m = json.loads((d / "manifest.json").read_text())
    m[key] = value
    (d / "manifest.json").write_text(json.dumps(m))
    assert _load_index_or_error(d) is None
