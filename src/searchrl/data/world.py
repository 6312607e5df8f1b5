"""The synthetic world: searchrl's embedded default corpus and question set.

A world is a graph of fictional entities (people, cities, countries, organisations, works) with
invented names, rendered as encyclopedia-style passages, plus 1-, 2- and 3-hop questions whose
answers (a name or a year) can only be found by searching: no model has seen these names. Every
question carries its exact hop chain (entity, relation, answer, search query, passage id), which
is what the format warm-start uses to write demonstrations.

- :func:`generate_world` builds a :class:`World` (graph only; passages and questions are rendered
  lazily, so a million-entity world costs a few hundred MB);
- :func:`write_world` streams ``corpus.jsonl`` (Search-R1 ``{"id", "contents"}``),
  ``questions.jsonl`` (the miniwiki question shape, plus ``num_hops`` and ``hops``) and
  ``world.json`` (seed, counts, version) into a folder;
- :func:`ensure_default_world` builds the default world once into the user cache
  (``~/.cache/searchrl/world-<seed>-<n>``, or ``$SEARCHRL_CACHE/world-<seed>-<n>``) and reuses it.

Output is a pure function of ``(seed, n_entities, options)`` and the generator's code: the same
arguments give byte-identical files. ``world.json`` records :data:`WORLD_VERSION` (bump it when
generation changes) and a hash of the generator's source, so a cached world made by other code
is rebuilt rather than silently reused.

Left out: loading a world back (use the corpus and QA loaders on the written files), and
languages other than English.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from searchrl.data import world_graph, world_names, world_questions, world_text
from searchrl.data.world_graph import MIN_ENTITIES, RELATIONS, Graph, build_graph
from searchrl.data.world_questions import iter_questions
from searchrl.data.world_text import render_entity
from searchrl.errors import ConfigError
from searchrl.types import Passage, QAExample

logger = logging.getLogger(__name__)

WORLD_VERSION = 1
DEFAULT_SEED = 0
DEFAULT_ENTITIES = 3000  # ~3.4k passages, 3k questions: indexes in a second, trains on a CPU
FILES = ("corpus.jsonl", "questions.jsonl", "world.json")
_PROGRESS_MIN = 20_000  # show progress bars for worlds at least this large


@dataclass(frozen=True)
class WorldConfig:
    """What a world is made of. ``n_questions`` ``None`` means one question per entity."""

    seed: int = DEFAULT_SEED
    n_entities: int = DEFAULT_ENTITIES
    n_questions: int | None = None
    test_fraction: float = 0.2  # share of questions in the test split
    hop_weights: tuple[float, ...] = (0.4, 0.4, 0.2)  # relative frequency of 1, 2, 3 hops
    twin_fraction: float = 0.12  # share of entities that are look-alike distractors
    two_passage_fraction: float = 0.15  # share of rich entities split over two passages
    filler: float = 1.0  # scale of the filler text around the facts (0 = facts only: short passages)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"world.seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.n_entities, int) or self.n_entities < MIN_ENTITIES:
            raise ConfigError(
                f"world.n_entities must be at least {MIN_ENTITIES}, got {self.n_entities}"
            )
        if self.n_questions is not None and self.n_questions < 0:
            raise ConfigError(f"world.n_questions must be >= 0, got {self.n_questions}")
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ConfigError(f"world.test_fraction must be in [0, 1], got {self.test_fraction}")
        w = self.hop_weights
        if not 1 <= len(w) <= 3 or any(x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"world.hop_weights needs 1-3 non-negative weights, got {w}")
        if not 0.0 <= self.filler <= 1.0:
            raise ConfigError(f"world.filler must be in [0, 1], got {self.filler}")
        for name in ("twin_fraction", "two_passage_fraction"):
            if not 0.0 <= getattr(self, name) <= 0.5:
                raise ConfigError(f"world.{name} must be in [0, 0.5], got {getattr(self, name)}")

    @property
    def question_count(self) -> int:
        return self.n_entities if self.n_questions is None else self.n_questions


@dataclass
class World:
    """A generated world: the entity graph, with passages and questions rendered on demand."""

    config: WorldConfig
    graph: Graph = field(repr=False)

    @property
    def seed(self) -> int:
        return self.config.seed

    def iter_passages(self) -> Iterator[Passage]:
        """Every passage in id order (``"0"``, ``"1"``, ...), titled with its entity's name."""
        g = self.graph
        for eid in range(len(g)):
            start = g.offsets[eid]
            for j, (text, _) in enumerate(render_entity(g, eid, self.config.filler)):
                yield Passage(str(start + j), g.names[eid], text)

    def iter_questions(self) -> Iterator[QAExample]:
        c = self.config
        yield from iter_questions(self.graph, c.question_count, c.hop_weights, c.test_fraction)

    @cached_property
    def passages(self) -> list[Passage]:
        return list(self.iter_passages())

    @cached_property
    def questions(self) -> list[QAExample]:
        return list(self.iter_questions())

    def distractors(self) -> list[tuple[str, str]]:
        """``(distractor name, original name)`` pairs of look-alike entities."""
        g = self.graph
        return [(g.names[e], g.names[b]) for e, b in enumerate(g.twin_of) if b >= 0]


def generate_world(
    seed: int = DEFAULT_SEED, n_entities: int = DEFAULT_ENTITIES, **options: Any
) -> World:
    """Build the world for ``seed`` with ``n_entities`` entities (``options``: see WorldConfig).

    >>> w = generate_world(seed=1, n_entities=60)
    >>> len(w.passages) >= 60 and w.passages[0].id == "0"
    True
    >>> q = w.questions[0]
    >>> hops = q.extra["hops"]
    >>> q.extra["num_hops"] == len(hops) and q.golden_answers == [hops[-1]["answer"]]
    True
    """
    try:
        config = WorldConfig(seed=seed, n_entities=n_entities, **options)
    except TypeError as e:
        raise ConfigError(f"world: {e}") from None
    graph = build_graph(seed, n_entities, config.twin_fraction, config.two_passage_fraction)
    return World(config, graph)


@lru_cache(maxsize=1)
def generator_fingerprint() -> str:
    """A short hash of the generator's source files (``"unknown"`` if they cannot be read)."""
    h = hashlib.sha256()
    try:
        for module in (world_names, world_graph, world_text, world_questions):
            h.update(Path(module.__file__).read_bytes())
        h.update(Path(__file__).read_bytes())
    except (OSError, TypeError):
        return "unknown"
    return h.hexdigest()[:16]


def _progress(total: int, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=total < _PROGRESS_MIN, leave=False)


def question_record(q: QAExample) -> dict[str, Any]:
    """The ``questions.jsonl`` line of a question: the miniwiki shape plus the hop chain."""
    rec = {"id": q.id, "question": q.question, "golden_answers": q.golden_answers, "split": q.split}
    rec.update(q.extra)
    return rec


def write_world(world: World, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Stream the world's three files into ``out_dir``; return the ``world.json`` content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g, c = world.graph, world.config
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        with _progress(g.n_passages_total, "world: passages", "passage") as bar:
            for p in world.iter_passages():
                f.write(json.dumps({"id": p.id, "contents": p.contents}) + "\n")
                bar.update()
    splits: Counter = Counter()
    hops: Counter = Counter()
    relations: Counter = Counter()
    with open(out / "questions.jsonl", "w", encoding="utf-8") as f:
        with _progress(c.question_count, "world: questions", "question") as bar:
            for q in world.iter_questions():
                f.write(json.dumps(question_record(q)) + "\n")
                splits[q.split] += 1
                hops[str(q.extra["num_hops"])] += 1
                relations.update(h["relation"] for h in q.extra["hops"])
                bar.update()
    info = {
        "version": WORLD_VERSION,
        "generator": generator_fingerprint(),
        "seed": c.seed,
        "config": asdict(c),
        "counts": {
            "entities": len(g),
            "types": g.type_counts(),
            "distractors": sum(b >= 0 for b in g.twin_of),
            "passages": g.n_passages_total,
            "facts": {r: sum(v >= 0 for v in g.rel[r]) for r in RELATIONS},
            "questions": sum(splits.values()),
            "splits": dict(sorted(splits.items())),
            "hops": dict(sorted(hops.items())),
            "question_relations": dict(sorted(relations.items())),
        },
    }
    (out / "world.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote world (seed %d): %d passages, %d questions to %s",
                c.seed, g.n_passages_total, info["counts"]["questions"], out)  # fmt: skip
    return info


def cache_root() -> Path:
    """``$SEARCHRL_CACHE`` if set, else ``~/.cache/searchrl``."""
    env = os.environ.get("SEARCHRL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "searchrl"


def default_world_dir(seed: int = DEFAULT_SEED, n_entities: int = DEFAULT_ENTITIES, **options: Any) -> Path:
    """Where :func:`ensure_default_world` keeps the world for ``(seed, n_entities, options)``."""
    suffix = "".join(f"-{k}{v}" for k, v in sorted(options.items()))
    return cache_root() / f"world-{seed}-{n_entities}{suffix}"


def _is_complete(folder: Path, seed: int, n_entities: int) -> bool:
    try:
        info = json.loads((folder / "world.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        info.get("version") == WORLD_VERSION
        and info.get("generator") == generator_fingerprint()
        and info.get("seed") == seed
        and info.get("counts", {}).get("entities") == n_entities
        and all((folder / name).is_file() for name in FILES)
    )


def ensure_default_world(seed: int = DEFAULT_SEED, n_entities: int = DEFAULT_ENTITIES, **options: Any) -> Path:
    """The folder of the default world, generated on first use (atomically) and reused after."""
    WorldConfig(seed=seed, n_entities=n_entities, **options)  # validate before touching the cache
    folder = default_world_dir(seed, n_entities, **options)
    if _is_complete(folder, seed, n_entities):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _generation_lock(folder):
        if _is_complete(folder, seed, n_entities):  # another process made it while we waited
            return folder
        logger.info("generating the synthetic world (seed %d, %d entities) into %s",
                    seed, n_entities, folder)  # fmt: skip
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a plain folder
            write_world(generate_world(seed, n_entities, **options), tmp)
            if _is_complete(folder, seed, n_entities):  # made meanwhile by a writer without the lock
                return folder  # (it may be reading it already: never replace a complete copy)
            if folder.exists():  # stale (older version) or partial: replace it
                shutil.rmtree(folder, ignore_errors=True)
            try:
                tmp.rename(folder)
            except OSError:  # another process won the race; its copy is identical
                if not _is_complete(folder, seed, n_entities):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextmanager
def _generation_lock(folder: Path) -> Iterator[None]:
    """One generator per world folder at a time (an exclusive ``flock`` on ``FOLDER.lock``, which
    the kernel drops if the holder dies): without it, a process that found no complete copy could
    delete one that another process renamed into place a moment later and is already reading (two
    ranks of one job start at once)."""
    fd = os.open(folder.parent / (folder.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with waiters)
