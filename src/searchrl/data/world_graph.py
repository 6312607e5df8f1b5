"""The entity graph of the synthetic world: fictional entities, their names and their facts.

Five entity types (countries, cities, people, organisations, works), kinds within them (an
organisation is a company, university, publisher, film studio or record label; a work is a book,
film or album) and sixteen relations, each either entity-valued (``born_in``: person -> city) or a
year (``birth_year``). Each subject has at most one value per relation, so every question has one
answer. A ``spouse`` fact is stored (and stated) in one direction only, in the first partner's
passage: the second partner's passage does not name the first, so a question through a marriage
still needs one passage per hop.

Some entities are *distractors*: twins of an earlier entity of the same type whose name shares a
part with it or is one letter off, and whose facts differ from it. Storage is compact (``array``
columns) so that a million entities fit in a few hundred MB. Everything comes from one
``random.Random`` seeded from the world seed, in a fixed order.

Left out: text (see :mod:`searchrl.data.world_text`) and questions
(:mod:`searchrl.data.world_questions`).
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass, field

from searchrl.data.world_names import NameMaker, stream_rng
from searchrl.errors import ConfigError

TYPES = ("country", "city", "person", "org", "work")
COUNTRY, CITY, PERSON, ORG, WORK = range(5)
ORG_KINDS = ("company", "university", "publisher", "studio", "label")
COMPANY, UNIVERSITY, PUBLISHER, STUDIO, LABEL = range(5)
WORK_KINDS = ("book", "film", "album")
BOOK, FILM, ALBUM = range(3)

RELATIONS = (
    "born_in", "birth_year", "spouse", "employer",  # person
    "founded_by", "headquartered_in", "founded_year",  # org (founded_year also city, country)
    "located_in", "capital",  # city, country
    "author", "director", "performer", "publisher", "studio", "label", "release_year",  # work
)  # fmt: skip
TYPE_RELATIONS = (  # relations each type may have, in RELATIONS order
    ("founded_year", "capital"),
    ("founded_year", "located_in"),
    ("born_in", "birth_year", "spouse", "employer"),
    ("founded_by", "headquartered_in", "founded_year"),
    ("author", "director", "performer", "publisher", "studio", "label", "release_year"),
)
YEAR_RELATIONS = frozenset({"birth_year", "founded_year", "release_year"})
CREATOR_REL = ("author", "director", "performer")  # by work kind
PRODUCER_REL = ("publisher", "studio", "label")  # by work kind
PRODUCER_KIND = (PUBLISHER, STUDIO, LABEL)  # org kind that produces each work kind

ORG_SUFFIXES = (
    ("Industries", "Works", "Holdings", "Foundry", "Mills", "Motors", "Labs", "Trading Company"),
    ("University", "Institute", "College", "Academy"),
    ("Press", "Books", "Publishing"),
    ("Pictures", "Studios", "Films"),
    ("Records", "Music", "Recordings"),
)
WORK_NOUNS = (
    ("Lantern", "Tides", "Orchard", "Letters", "Harbour", "Winter", "Crown", "Mirror", "Ashes",
     "Garden", "Chronicle", "Silence", "Bridge", "Daughter", "Compass", "Archive"),
    ("Horizon", "Shadow", "Storm", "Frontier", "Signal", "Voyage", "Ember", "Night", "Rivals",
     "Escape", "Machine", "Summit", "Outpost", "Fortune", "Tunnel", "Verdict"),
    ("Echoes", "Skylines", "Lullaby", "Static", "Parade", "Waves", "Neon", "Daybreak", "Velvet",
     "Anthem", "Carousel", "Fever", "Satellite", "Embers", "Ritual", "Mosaic"),
)  # fmt: skip
WORK_PATTERNS = ("The {w} {n}", "{n} of {w}", "{w} {n}", "The {n} of {w}")
OCCUPATIONS = (
    "novelist", "painter", "engineer", "architect", "film director", "composer", "chemist",
    "historian", "singer", "economist", "sculptor", "journalist", "physician", "poet",
    "mathematician", "photographer", "diplomat", "inventor", "teacher", "botanist",
)  # fmt: skip
MIN_ENTITIES = 24
STREAM_GRAPH, STREAM_LAYOUT, STREAM_TEXT, STREAM_QUESTIONS = range(4)  # see stream_rng


@dataclass
class Graph:
    """All entities and facts. Relation columns hold an entity id or a year, ``-1`` when absent."""

    seed: int
    names: list[str] = field(default_factory=list)
    types: array = field(default_factory=lambda: array("b"))
    subkinds: array = field(default_factory=lambda: array("b"))  # org/work kind, occupation
    genders: array = field(default_factory=lambda: array("b"))  # people: 0 she, 1 he
    twin_of: array = field(default_factory=lambda: array("i"))  # distractor's original, or -1
    rel: dict[str, array] = field(default_factory=dict)
    n_passages: array = field(default_factory=lambda: array("b"))
    offsets: array = field(default_factory=lambda: array("q"))  # first passage index per entity
    ranges: list[range] = field(default_factory=list)  # entity ids of each type (contiguous)

    def __len__(self) -> int:
        return len(self.names)

    def facts(self, eid: int) -> list[tuple[str, int]]:
        """``(relation, value)`` pairs of one entity, in :data:`RELATIONS` order."""
        rel = self.rel
        return [(r, rel[r][eid]) for r in TYPE_RELATIONS[self.types[eid]] if rel[r][eid] >= 0]

    def value(self, eid: int, relation: str) -> int:
        return self.rel[relation][eid]

    def answer_text(self, relation: str, value: int) -> str:
        """The answer string of a fact: a year as digits, else the object's name."""
        return str(value) if relation in YEAR_RELATIONS else self.names[value]

    def passage_ids(self, eid: int) -> list[str]:
        start = self.offsets[eid]
        return [str(start + j) for j in range(self.n_passages[eid])]

    @property
    def n_passages_total(self) -> int:
        return int(self.offsets[-1]) if len(self.offsets) else 0

    def type_counts(self) -> dict[str, int]:
        counts = [0] * len(TYPES)
        for t in self.types:
            counts[t] += 1
        return {name: counts[i] for i, name in enumerate(TYPES)}


def type_counts(n_entities: int) -> list[int]:
    """How many entities of each type (in :data:`TYPES` order) a world of ``n_entities`` has."""
    if n_entities < MIN_ENTITIES:
        raise ConfigError(f"world: n_entities must be at least {MIN_ENTITIES}, got {n_entities}")
    countries = max(2, round(n_entities * 0.0125))
    cities = max(4, round(n_entities * 0.15))
    orgs = max(5, round(n_entities * 0.14))
    works = max(3, round(n_entities * 0.2))
    return [countries, cities, n_entities - countries - cities - orgs - works, orgs, works]


def build_graph(
    seed: int, n_entities: int, twin_fraction: float = 0.12, two_passage_fraction: float = 0.15
) -> Graph:
    """Build the whole entity graph for ``seed`` (deterministic)."""
    counts = type_counts(n_entities)
    rng = stream_rng(seed, STREAM_GRAPH)
    g = Graph(seed=seed)
    g.rel = {name: array("i", [-1]) * n_entities for name in RELATIONS}
    g.ranges = _ranges(counts)
    _name_entities(g, rng, counts, twin_fraction)
    _assign_facts(g, rng, counts)
    for eid in range(n_entities):
        many = g.types[eid] in (PERSON, ORG, WORK) and len(g.facts(eid)) >= 3
        g.n_passages.append(2 if many and rng.random() < two_passage_fraction else 1)
    g.offsets.append(0)
    for k in g.n_passages:
        g.offsets.append(g.offsets[-1] + k)
    return g


def _ranges(counts: list[int]) -> list[range]:
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def _name_entities(g: Graph, rng: random.Random, counts: list[int], twin_fraction: float) -> None:
    maker, full_used = NameMaker(), set()
    n_people = counts[PERSON]
    first_pool = [maker.word(rng, 2, 3) for _ in range(max(8, n_people // 20))]
    surname_pool = [maker.word(rng, 2, 3) for _ in range(max(8, n_people // 2))]
    for etype, erange in enumerate(_ranges(counts)):
        for i, eid in enumerate(erange):
            sub = _subkind(rng, etype, i)
            base = -1
            if etype != COUNTRY and i >= len(ORG_KINDS) and rng.random() < twin_fraction:
                base = rng.randrange(erange.start, eid)
                if etype in (ORG, WORK) and g.subkinds[base] != sub:
                    sub = g.subkinds[base]
            name = _twin_name(g, rng, maker, etype, sub, base, full_used) if base >= 0 else None
            if name is None:
                base = -1
                name = _fresh_name(rng, maker, etype, sub, first_pool, surname_pool, full_used)
            full_used.add(name)
            g.names.append(name)
            g.types.append(etype)
            g.subkinds.append(sub)
            g.genders.append(rng.randrange(2) if etype == PERSON else 0)
            g.twin_of.append(base)


def _subkind(rng: random.Random, etype: int, i: int) -> int:
    if etype == ORG:  # every kind at least once, then weighted
        return i if i < len(ORG_KINDS) else rng.choices(range(5), (4, 2, 2, 2, 2))[0]
    if etype == WORK:
        return i if i < len(WORK_KINDS) else rng.randrange(len(WORK_KINDS))
    if etype == PERSON:
        return rng.randrange(len(OCCUPATIONS))
    return 0


def _fresh_name(rng, maker, etype, sub, first_pool, surname_pool, full_used) -> str:
    while True:
        if etype == COUNTRY:
            return maker.country(rng)
        if etype == CITY:
            return maker.word(rng, 2, 3)
        if etype == PERSON:
            name = f"{rng.choice(first_pool)} {rng.choice(surname_pool)}"
        elif etype == ORG:
            name = f"{maker.word(rng, 2, 3)} {rng.choice(ORG_SUFFIXES[sub])}"
        else:
            pattern, noun = rng.choice(WORK_PATTERNS), rng.choice(WORK_NOUNS[sub])
            name = pattern.format(w=maker.word(rng, 2, 3), n=noun)
        if name not in full_used:
            return name


def _twin_name(g, rng, maker, etype, sub, base, full_used) -> str | None:
    """A name sharing a part with, or one letter off, ``base``'s name; ``None`` if none found."""
    old = g.names[base]
    for _ in range(8):
        if etype == CITY:
            name = maker.variant(rng, old)
        elif etype == PERSON:  # same first name, surname one letter off
            first, last = old.split(" ", 1)
            new = maker.variant(rng, last)
            name = f"{first} {new}" if new else None
        elif etype == ORG:  # same word, another suffix of the same kind
            word = old.split(" ", 1)[0]
            name = f"{word} {rng.choice(ORG_SUFFIXES[sub])}"
        else:  # same invented word, another noun or pattern
            words = [w for w in old.split(" ") if w.lower() in maker.used]
            noun = rng.choice(WORK_NOUNS[sub])
            name = rng.choice(WORK_PATTERNS).format(w=words[0], n=noun) if words else None
        if name and name not in full_used:
            return name
    return None


def _pick(rng: random.Random, seq, avoid: int = -1) -> int:
    """A random element of ``seq`` other than ``avoid`` (when there is another)."""
    v = seq[rng.randrange(len(seq))]
    for _ in range(8):
        if v != avoid or len(seq) < 2:
            break
        v = seq[rng.randrange(len(seq))]
    return v


def _year(rng: random.Random, lo: int, hi: int, avoid: int = -1) -> int:
    v = rng.randint(lo, hi)
    return v if v != avoid else (v + 1 if v < hi else v - 1)


def _assign_facts(g: Graph, rng: random.Random, counts: list[int]) -> None:
    countries, cities, people, orgs, works = _ranges(counts)
    r, tw = g.rel, g.twin_of
    orgs_by_kind = [[o for o in orgs if g.subkinds[o] == k] for k in range(len(ORG_KINDS))]

    def avoid(eid: int, relation: str) -> int:
        return r[relation][tw[eid]] if tw[eid] >= 0 else -1

    for c in countries:
        r["founded_year"][c] = _year(rng, 1000, 1850)
    cities_of: list[list[int]] = [[] for _ in countries]
    for i, c in enumerate(cities):
        if i < len(countries):  # every country gets a city first
            country = countries[i]
        else:
            country = _pick(rng, countries, avoid(c, "located_in"))
        r["located_in"][c] = country
        cities_of[country - countries.start].append(c)
        r["founded_year"][c] = _year(rng, 1000, 1900, avoid(c, "founded_year"))
    for c in countries:
        r["capital"][c] = _pick(rng, cities_of[c - countries.start])
    for p in people:
        r["birth_year"][p] = _year(rng, 1850, 2000, avoid(p, "birth_year"))
        r["born_in"][p] = _pick(rng, cities, avoid(p, "born_in"))
        if rng.random() < 0.85:
            r["employer"][p] = _pick(rng, orgs, avoid(p, "employer"))
    order = list(people)
    rng.shuffle(order)
    n_pairs = len(order) // 5  # 40% of people are married; the fact is stated on one side
    for a, b in zip(order[:n_pairs], order[n_pairs : 2 * n_pairs]):
        r["spouse"][a] = b
    for o in orgs:
        founder = _pick(rng, people, avoid(o, "founded_by"))
        r["founded_by"][o] = founder
        r["headquartered_in"][o] = _pick(rng, cities, avoid(o, "headquartered_in"))
        born = r["birth_year"][founder]
        r["founded_year"][o] = min(2020, born + rng.randint(22, 60))
    for w in works:
        kind = g.subkinds[w]
        creator = _pick(rng, people, avoid(w, CREATOR_REL[kind]))
        r[CREATOR_REL[kind]][w] = creator
        r[PRODUCER_REL[kind]][w] = _pick(
            rng, orgs_by_kind[PRODUCER_KIND[kind]], avoid(w, PRODUCER_REL[kind])
        )
        r["release_year"][w] = min(2023, r["birth_year"][creator] + rng.randint(18, 70))
