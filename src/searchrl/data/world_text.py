"""Encyclopedia-style passages for the synthetic world's entities.

Each entity gets one passage (sometimes two, its facts split between them), titled with its name,
of about 40-120 words: an introduction naming the entity, one sentence per fact drawn from several
templates per relation (some sentences state two facts, e.g. place and year of birth), and filler
sentences about things no question asks (population, awards, ...), in shuffled order. Fillers hold
no invented names and no four-digit numbers, so they can never be mistaken for an answer. Each
answer string appears verbatim. Rendering one entity depends only on ``(seed, entity id)``, so a
corpus can be written in any order or in parallel.

Left out: inverse facts (a person's passage does not list the works they wrote): a multi-hop
question then needs one passage per hop, never a single passage naming the start and the answer.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

from searchrl.data.world_graph import (
    BOOK, CITY, COUNTRY, OCCUPATIONS, ORG, PERSON, STREAM_LAYOUT, STREAM_TEXT, WORK, Graph,
)  # fmt: skip
from searchrl.data.world_names import stream_rng

# {S} subject reference, {N} full name, {P} possessive, {pp}/{pr} possessive/subject pronoun,
# {o} object name, {y} year.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "born_in": ("{S} was born in {o}.", "{S} was born in the city of {o}.",
                "{P} birthplace is {o}.", "{o} is the birthplace of {N}."),
    "birth_year": ("{S} was born in {y}.", "{S} was born in the year {y}.",
                   "{P} year of birth is {y}."),
    "spouse": ("{S} is married to {o}.", "{P} spouse is {o}.", "{S} married {o}.",
               "{N} and {o} are married."),
    "employer": ("{S} works for {o}.", "{S} is employed by {o}.", "{P} employer is {o}.",
                 "{S} has spent most of {pp} career at {o}."),
    "founded_by": ("{S} was founded by {o}.", "{P} founder is {o}.", "{o} founded {N}.",
                   "The founder of {N} is {o}."),
    "headquartered_in": ("{S} is headquartered in {o}.", "{P} headquarters are in {o}.",
                         "{S} is based in the city of {o}.", "{S} has its headquarters in {o}."),
    "founded_year": ("{S} was founded in {y}.", "{S} was established in {y}.",
                     "{P} founding year is {y}."),
    "located_in": ("{S} is a city in {o}.", "{S} lies in the country of {o}.",
                   "{S} is located in {o}.", "{S} belongs to the country of {o}."),
    "capital": ("{P} capital is {o}.", "The capital of {N} is {o}.", "{o} is the capital of {N}.",
                "{P} capital city is {o}."),
    "author": ("{S} was written by {o}.", "The author of {N} is {o}.", "{o} wrote {N}.",
               "{S} is a novel by {o}."),
    "director": ("{S} was directed by {o}.", "The director of {N} is {o}.", "{o} directed {N}.",
                 "{S} is a film by {o}."),
    "performer": ("{S} was recorded by {o}.", "{S} is an album by {o}.", "{o} recorded {N}.",
                  "The artist behind {N} is {o}."),
    "publisher": ("{S} was published by {o}.", "{P} publisher is {o}.", "{o} published {N}."),
    "studio": ("{S} was produced by {o}.", "{P} studio is {o}.", "{o} produced {N}."),
    "label": ("{S} was released by the label {o}.", "{P} record label is {o}.",
              "{o} released {N}."),
    "release_year": ("{S} was released in {y}.", "{S} came out in {y}.",
                     "{P} release year is {y}."),
}  # fmt: skip
BOOK_YEAR = ("{S} was first published in {y}.", "{S} was published in {y}.",
             "{P} year of publication is {y}.")  # fmt: skip
COMBINED = {  # two facts in one sentence: (first relation, second relation) -> templates
    ("born_in", "birth_year"): ("{S} was born in {o} in {y}.", "{S} was born in {y} in {o}."),
    ("founded_by", "founded_year"): ("{S} was founded by {o} in {y}.", "{o} founded {N} in {y}."),
}
TYPE_NOUN = {CITY: ("the city", "the town"), COUNTRY: ("the country",)}
ORG_NOUN = ("the company", "the university", "the publisher", "the studio", "the label")
WORK_NOUN = ("the novel", "the film", "the album")

V = {
    "occ_adj": ("prolific", "celebrated", "self-taught", "influential", "reclusive", "versatile"),
    "topic": ("bold colour", "careful research", "public lectures", "quiet humour", "long essays",
              "restoring old buildings", "teaching children", "experimental methods"),
    "field": ("music", "mathematics", "law", "medicine", "history", "design", "chemistry"),
    "hobby": ("sailing", "chess", "gardening", "birdwatching", "long walks", "baking bread"),
    "trait": ("patient", "stubborn", "generous", "meticulous", "witty", "ambitious", "calm"),
    "size": ("small", "large", "busy", "quiet", "historic", "growing"),
    "place": ("city", "port city", "market town", "river city", "mountain town", "city"),
    "craft": ("glassworks", "textile markets", "clock makers", "spice trade", "shipyards"),
    "feature": ("stone bridge", "covered market", "botanical garden", "lighthouse",
                "old cathedral", "tram network", "harbour"),
    "industry": ("fishing", "mining", "tourism", "farming", "shipbuilding", "banking", "forestry"),
    "landscape": ("mountain passes", "long coastline", "salt lakes", "pine forests",
                  "river valleys"),
    "sector": ("shipping", "chemicals", "software", "textile", "food", "engineering", "energy"),
    "product": ("machine tools", "reference books", "river ferries", "garden tools", "paints"),
    "genre": ("historical", "comic", "science fiction", "mystery", "romantic", "experimental"),
    "plot": ("two rival families", "a lost expedition", "a stolen painting", "an exiled prince",
             "a failing orchestra", "three sisters at sea", "a forgotten inventor"),
    "event": ("book fair", "rowing race", "music festival", "chess tournament", "lantern parade"),
    "emblem": ("a red circle", "a white heron", "two crossed keys", "a golden wheel", "a blue star"),
    "cause": ("public libraries", "river conservation", "young artists", "night schools"),
    "aspect": ("style", "structure", "ending", "opening", "tone", "imagery", "pacing"),
}  # fmt: skip
INTRO = {
    PERSON: ("{N} is a {occ}.", "{N} is a {occ_adj} {occ}.", "{N} is a {occ} known for {topic}."),
    CITY: ("{N} is a {size} {place}.", "{N} is a {place}."),
    COUNTRY: ("{N} is a country.", "{N} is a {size} country known for its {landscape}."),
    ORG: ("{N} is a {sector} company.", "{N} is a public university.",
          "{N} is a publishing house.", "{N} is a film studio.", "{N} is a record label."),
    WORK: ("{N} is a {genre} novel.", "{N} is a {genre} film.", "{N} is a {genre} album."),
}  # fmt: skip
SECOND_INTRO = ("There is more to tell about {N}.", "{N} has a long history.")
FILLERS = {
    PERSON: ("{S} is known for {pp} work on {topic}.", "In {pp} spare time {pr} enjoys {hobby}.",
             "{S} has received several awards for {pp} contributions to {field}.",
             "Colleagues describe {N} as {trait} and {trait2}.",
             "{S} first studied {field} before changing direction.",
             "{S} gave a well attended series of lectures on {topic}.",
             "{S} is a keen supporter of {cause}.", "{S} lived abroad for several years.",
             "{P} early work went largely unnoticed.", "{S} later taught {field} to students."),
    CITY: ("About {pop} people live in {S}.", "The city is known for its {craft}.",
           "{S} has a {feature} and a {feature2}.", "Its economy relies on {industry}.",
           "Visitors often come to see the {feature}.",
           "A yearly {event} draws visitors to {S}.", "{S} is served by a regional railway."),
    COUNTRY: ("{S} has a population of about {bigpop}.",
              "Its economy is based on {industry} and {industry2}.",
              "The country is known for its {landscape}.",
              "{S} is a member of several regional trade agreements.",
              "{S} is divided into {regions} provinces.", "Its flag shows {emblem}."),
    ORG: ("{S} employs about {staff} people.", "{S} has offices in several countries.",
          "{P} early years were difficult.", "{P} logo shows {emblem}.",
          "{S} sponsors a yearly {event}.", "{S} changed owners several times.",
          "{S} runs a small museum about its own history.", "{S} is owned by its employees.",
          "{S} publishes a yearly report on {topic}."),
    WORK: ("Critics praised its {aspect}.", "It was well received on its release.",
           "Its {aspect} has been widely discussed.",
           "It has been translated into {langs} languages.", "Its {aspect} divided critics.",
           "It won a regional prize for its {aspect}.", "Its cover shows {emblem}."),
}  # fmt: skip
ORG_FILLERS = (  # by organisation kind
    ("It is best known for its {product}.",),
    ("It has about {students} students.", "It is known for its {field} faculty."),
    ("It is best known for its {genre} titles.",),
    ("It is best known for its {genre} films.",),
    ("It is best known for its {genre} records.",),
)
WORK_FILLERS = (  # by work kind
    ("The story follows {plot}.", "The book has {pages} pages.",
     "A stage adaptation followed some years later."),
    ("The story follows {plot}.", "It runs for {mins} minutes.",
     "A stage adaptation followed some years later."),
    ("Its songs are about {plot}.", "The album contains {tracks} tracks.",
     "It was reissued many years later.", "Its closing track became a radio favourite."),
)


def layout(g: Graph, eid: int) -> list[list[str]]:
    """Which relations each of the entity's passages states (one list per passage)."""
    rels = [r for r, _ in g.facts(eid)]
    if g.n_passages[eid] == 1:
        return [rels]
    rng = stream_rng(g.seed, STREAM_LAYOUT, eid)
    rng.shuffle(rels)
    half = (len(rels) + 1) // 2
    return [rels[:half], rels[half:]]


class _Subject:
    """How sentences refer to one entity (name, short name, pronouns, type noun)."""

    def __init__(self, g: Graph, eid: int):
        self.name, self.etype, self.sub = g.names[eid], g.types[eid], g.subkinds[eid]
        if self.etype == PERSON:
            self.short = self.name.split(" ", 1)[1]
            self.pr, self.pp = ("she", "her") if g.genders[eid] == 0 else ("he", "his")
            self.nouns: tuple[str, ...] = ()
        else:
            self.short, self.pr, self.pp = self.name, "it", "its"
            self.nouns = TYPE_NOUN.get(self.etype) or (
                (ORG_NOUN[self.sub],) if self.etype == ORG else (WORK_NOUN[self.sub],)
            )

    def ref(self, rng) -> str:
        u = rng.random()
        if u < 0.4:
            return self.name
        if self.etype == PERSON:
            return self.short if u < 0.7 else self.pr
        return rng.choice(self.nouns) if u < 0.7 else self.pr

    def possessive(self, rng) -> str:
        u = rng.random()
        if u < 0.5:
            return f"{self.name}'s"
        if u < 0.7 and self.etype == PERSON:
            return f"{self.short}'s"
        return self.pp if self.etype == PERSON or u < 0.8 else f"{rng.choice(self.nouns)}'s"


_A_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


NUMBERS = {"pop": (12_000, 900_000), "bigpop": (1_200_000, 60_000_000), "staff": (40, 950),
           "students": (10_000, 60_000), "langs": (3, 40), "regions": (4, 30),
           "pages": (120, 900), "mins": (85, 190), "tracks": (8, 16)}  # fmt: skip


@lru_cache(maxsize=None)
def _fields(template: str) -> tuple[tuple[str, ...], bool]:
    """The template's slot names in order, and whether an "a" before a slot may need "an"."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in names:
            names.append(name)
    return tuple(names), " a {" in template


def _fill(template: str, subj: _Subject, rng, **slots: str) -> str:
    """Format one sentence; only the slots a template uses are drawn (keeps the rng stream)."""
    names, article = _fields(template)
    values = dict(slots)
    for key in names:
        if key in values:
            continue
        if key == "S":
            values["S"] = subj.ref(rng)
        elif key == "P":
            values["P"] = subj.possessive(rng)
        elif key in V:
            values[key], values[key + "2"] = rng.sample(V[key], 2)
        elif key in NUMBERS:
            n = rng.randint(*NUMBERS[key])
            values[key] = f"{n:,}" if n >= 10_000 else str(n)
        else:
            values[key] = {"N": subj.name, "pp": subj.pp, "pr": subj.pr,
                           "occ": OCCUPATIONS[subj.sub]}[key]  # fmt: skip
    text = template.format(**values)
    return _cap(_A_VOWEL.sub(r"\1n ", text) if article else text)


def _fact_sentences(g: Graph, eid: int, subj: _Subject, rels: list[str], rng) -> list[str]:
    out, todo = [], list(rels)
    for (a, b), templates in COMBINED.items():
        if a in todo and b in todo and rng.random() < 0.5:
            todo.remove(a)
            todo.remove(b)
            o, y = g.names[g.value(eid, a)], str(g.value(eid, b))
            out.append(_fill(rng.choice(templates), subj, rng, o=o, y=y))
    for rel in todo:
        templates = FACT_TEMPLATES[rel]
        if rel == "release_year" and subj.sub == BOOK:
            templates = BOOK_YEAR
        value = g.value(eid, rel)
        obj = g.answer_text(rel, value)
        out.append(_fill(rng.choice(templates), subj, rng, o=obj, y=obj))
    return out


def render_entity(g: Graph, eid: int, filler: float = 1.0) -> list[tuple[str, list[str]]]:
    """The entity's passages as ``(text, relations stated)``; the title is ``g.names[eid]``.

    ``filler`` scales the target length that filler sentences pad a passage to (0: facts only)."""
    rng = stream_rng(g.seed, STREAM_TEXT, eid)
    subj = _Subject(g, eid)
    pool = list(FILLERS[subj.etype])
    if subj.etype in (ORG, WORK):
        pool.extend((ORG_FILLERS if subj.etype == ORG else WORK_FILLERS)[subj.sub])
    rng.shuffle(pool)
    groups, out = layout(g, eid), []
    for j, rels in enumerate(groups):
        if j == 0:
            intro_t = INTRO[subj.etype]
            intro_t = (intro_t[subj.sub],) if subj.etype in (ORG, WORK) else intro_t
        else:
            intro_t = SECOND_INTRO
        body = _fact_sentences(g, eid, subj, rels, rng)
        fillers = pool[j :: len(groups)]  # no filler repeats across an entity's passages
        target = filler * (rng.randint(50, 95) if len(groups) == 1 else rng.randint(40, 60))
        sentences = [_fill(rng.choice(intro_t), subj, rng)]
        words = len(sentences[0].split()) + sum(len(s.split()) for s in body)
        for t in fillers:
            if words >= target:
                break
            s = _fill(t, subj, rng)
            body.insert(rng.randint(0, len(body)), s)
            words += len(s.split())
        out.append((" ".join(sentences + body), rels))
    return out

