"""Comparison questions built from the facts that hop chains record: "which came first" and "same?".

Real multi-hop sets ask about two entities at once: 2WikiMultihopQA's questions are mostly "Which
film came out first, A or B?" (the answer is one of the two names in the question) or "Are A and B
from the same country?" (yes / no), and HotpotQA has such questions too. The synthetic world's
walks never ask them, so a warm-start on its demonstrations alone teaches an agent to answer every
question with the last passage's fact. This module pairs facts that the hop records of any
questions state (``{"entity", "relation", "answer", "query"}``; no graph needed) into:

- ``earlier`` / ``later``: two entities with different years of the same relation (``birth_year``,
  ``release_year``, ``founded_year``); the answer is the name of the earlier (later) one;
- ``same``: two entities with a value of the same relation (``born_in``, ``director``, ...); the
  answer is ``yes`` when the values are equal, else ``no`` (half of each where the facts allow).

Each question's ``extra`` holds the two hops (one search each), ``"compare"`` (the kind) and
``"num_hops": 2``; :func:`searchrl.training.sft.demo_turns` writes their demonstrations.

Left out: comparisons through a chain ("whose director was born first"), which need four searches.
"""

from __future__ import annotations

import random
from collections import defaultdict

from searchrl.types import QAExample

COMPARE_KINDS = ("earlier", "later", "same")
YEAR_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "birth_year": {"earlier": ("Who was born first, {a} or {b}?", "Who is older, {a} or {b}?"),
                   "later": ("Who was born later, {a} or {b}?", "Who is younger, {a} or {b}?")},
    "release_year": {"earlier": ("Which came out first, {a} or {b}?", "Which was released earlier, {a} or {b}?"),
                     "later": ("Which was released more recently, {a} or {b}?", "Which came out later, {a} or {b}?")},
    "founded_year": {"earlier": ("Which was founded first, {a} or {b}?", "Which is older, {a} or {b}?"),
                     "later": ("Which was founded more recently, {a} or {b}?",
                               "Which was established later, {a} or {b}?")},
}  # fmt: skip
SAME_QUESTIONS: dict[str, tuple[str, ...]] = {
    "born_in": ("Were {a} and {b} born in the same city?", "Do {a} and {b} share a birthplace?"),
    "employer": ("Do {a} and {b} work for the same organisation?", "Do {a} and {b} have the same employer?"),
    "located_in": ("Are {a} and {b} in the same country?", "Are {a} and {b} located in the same country?"),
    "headquartered_in": ("Are {a} and {b} headquartered in the same city?",),
    "author": ("Were {a} and {b} written by the same person?", "Do {a} and {b} have the same author?"),
    "director": ("Were {a} and {b} directed by the same person?", "Do {a} and {b} have the same director?"),
    "performer": ("Were {a} and {b} recorded by the same artist?",),
    "publisher": ("Were {a} and {b} published by the same company?",),
    "studio": ("Were {a} and {b} produced by the same studio?",),
    "label": ("Were {a} and {b} released on the same label?",),
    "founded_by": ("Were {a} and {b} founded by the same person?",),
}  # fmt: skip


def known_facts(examples: list[QAExample]) -> dict[str, list[dict]]:
    """The distinct facts stated by the hop records of ``examples``, by relation (first record of
    each ``(entity, relation)`` wins, in the examples' order)."""
    seen: set[tuple[str, str]] = set()
    by_rel: dict[str, list[dict]] = defaultdict(list)
    for e in examples:
        for h in (e.extra or {}).get("hops") or ():
            key = (h["entity"], h["relation"])
            if key not in seen:
                seen.add(key)
                by_rel[h["relation"]].append(h)
    return by_rel


def comparison_questions(examples: list[QAExample], n: int, seed: int = 0, split: str = "train") -> list[QAExample]:
    """Up to ``n`` distinct comparison questions over the facts of ``examples``' hop chains: half
    ``earlier`` / ``later`` (alternating), half ``same`` (alternating yes and no), fewer where the
    facts run out. Deterministic in ``seed``.

    >>> from searchrl.types import QAExample
    >>> hop = lambda e, r, a: {"entity": e, "relation": r, "answer": a, "query": f"{e} {r}"}
    >>> exs = [QAExample(str(i), "q", [a], extra={"hops": [hop(e, "release_year", a)]})
    ...        for i, (e, a) in enumerate([("Dawn", "1990"), ("Dusk", "1975")])]
    >>> q = comparison_questions(exs, 1)[0]
    >>> q.question, q.golden_answers, q.extra["compare"]
    ('Which was released earlier, Dusk or Dawn?', ['Dusk'], 'earlier')
    """
    rng = random.Random(seed)
    facts = known_facts(examples)
    year_rels = sorted(r for r in facts if r in YEAR_QUESTIONS and len(facts[r]) >= 2)
    same_rels = sorted(r for r in facts if r in SAME_QUESTIONS and len(facts[r]) >= 2)
    shared = {r: groups for r in same_rels if (groups := [g for g in _group(facts[r]).values() if len(g) >= 2])}
    out: list[QAExample] = []
    asked: set[tuple] = set()
    tries = n_year = n_same = 0
    while len(out) < n and (year_rels or same_rels) and tries < 50 * max(n, 1):
        tries += 1
        if (len(out) % 2 == 0 and year_rels) or not same_rels:
            rel = rng.choice(year_rels)
            a, b = rng.sample(facts[rel], 2)
            if a["answer"] == b["answer"] or not (a["answer"].isdigit() and b["answer"].isdigit()):
                continue
            kind = COMPARE_KINDS[n_year % 2]  # earlier, later, earlier, ...
            pick = min if kind == "earlier" else max
            answer = pick((a, b), key=lambda h: int(h["answer"]))["entity"]
            text = rng.choice(YEAR_QUESTIONS[rel][kind])
        else:
            kind = "same"
            if n_same % 2 == 0 and shared:  # a "yes": two entities from one group of equal values
                rel = rng.choice(sorted(shared))
                a, b = rng.sample(rng.choice(shared[rel]), 2)
            else:
                rel = rng.choice(same_rels)
                a, b = rng.sample(facts[rel], 2)
                if a["answer"] == b["answer"]:
                    continue
            answer = "yes" if a["answer"] == b["answer"] else "no"
            text = rng.choice(SAME_QUESTIONS[rel])
        if a["entity"] == b["entity"]:
            continue
        key = (kind, rel, *sorted((a["entity"], b["entity"])))
        if key in asked:
            continue
        asked.add(key)
        if kind == "same":
            n_same += 1
        else:
            n_year += 1
        extra = {"answerable": True, "num_hops": 2, "compare": kind, "hops": [dict(a), dict(b)]}
        out.append(QAExample(f"compare{seed}-{len(out)}", text.format(a=a["entity"], b=b["entity"]), [answer],
                             split, "world-compare", extra))
    return out


def _group(facts: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for h in facts:
        groups[h["answer"]].append(h)
    return groups
