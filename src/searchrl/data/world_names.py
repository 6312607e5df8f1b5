"""Invented, pronounceable, unique names for the synthetic world (syllable-based).

:class:`NameMaker` mints words from onset-vowel-coda syllables and remembers every word it has
handed out, so a word belongs to one role only (a surname is never also a city). It also makes
*distractor* variants of an existing word: one letter off (a vowel swapped), which a model or a
retriever could confuse with the original.

Words never end in an English suffix that a Snowball/Porter stemmer strips (``-s``, ``-e``, ``-er``,
``-ed``, ``-ing``, ``-al``, ...), so BM25 with stemming keeps every name a distinct token. All
randomness comes from the ``random.Random`` passed in; nothing depends on ``hash()`` order.

Left out: checking names against real words or real names (syllable words are rare enough), and
non-Latin scripts.
"""

from __future__ import annotations

import random

FIRST_ONSETS = (
    "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "gr", "kr", "tr", "th", "st", "sk", "fl", "gl", "pr", "sh", "", "",
)  # fmt: skip
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o") * 2 + ("ai", "ei", "ou")
INNER_CODAS = ("", "", "", "", "n", "r", "l", "m", "s")
FINAL_CODAS = ("n", "r", "l", "m", "k", "th", "nd", "rk", "sh", "v", "rn", "lt", "x", "a", "o")
SINGLE_VOWELS = "aeiou"
# endings a stemmer would strip or rewrite (checked on the lowercased word)
BAD_ENDINGS = (
    "e", "s", "y", "er", "al", "ic", "ed", "ing", "ly", "li", "ism", "ent", "ant", "ous", "ive",
    "ize", "ion", "ful", "ness", "able", "ible", "ance", "ence", "ment", "ator", "iti", "eed",
)  # fmt: skip
BAD_PAIRS = ("uu", "ii", "aa", "ouo", "aia", "eie", "ae", "ea", "oa", "ao", "io", "iai")
COUNTRY_ENDINGS = ("ia", "ora", "and", "ar", "ovia", "esh", "oth", "aria", "ith")


def stream_rng(seed: int, stream: int, index: int = 0) -> random.Random:
    """An independent generator for ``(seed, stream, index)``: no ``hash()``, and distinct
    triples give distinct seeds while ``stream < 256`` and ``index < 2**40``.

    >>> stream_rng(3, 1, 7).random() == stream_rng(3, 1, 7).random() != stream_rng(3, 2, 7).random()
    True
    """
    return random.Random((seed << 48) | (stream << 40) | index)


class NameMaker:
    """Mints unique invented words; ``used`` holds every word handed out (lowercased)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def _stem(self, rng: random.Random, n_syllables: int) -> str:
        """Onset-vowel syllables; the first may close with a consonant (``"Vel" + "mo"``)."""
        parts = [rng.choice(FIRST_ONSETS), rng.choice(VOWELS), rng.choice(INNER_CODAS)]
        for _ in range(n_syllables - 1):
            parts += (rng.choice(ONSETS), rng.choice(VOWELS))
        return "".join(parts)

    def _ok(self, word: str) -> bool:
        low = word.lower()
        if len(low) < 4 or len(low) > 11 or low in self.used:
            return False
        if low.endswith(BAD_ENDINGS):
            return False
        # no triple letters and no doubled vowels pairs that read badly ("aai", "uu")
        for i in range(len(low) - 2):
            if low[i] == low[i + 1] == low[i + 2]:
                return False
        return not any(pair in low for pair in BAD_PAIRS)

    def word(self, rng: random.Random, min_syllables: int = 2, max_syllables: int = 3) -> str:
        """A new unique word of ``min..max`` syllables, capitalised (``"Velmora"``-like)."""
        while True:
            n = rng.randint(min_syllables, max_syllables)
            cand = self._stem(rng, n) + rng.choice(FINAL_CODAS)
            if self._ok(cand):
                self.used.add(cand)
                return cand.capitalize()

    def country(self, rng: random.Random) -> str:
        """A new unique country-like word (``"Vessaria"``, ``"Drumand"``)."""
        while True:
            cand = self._stem(rng, rng.randint(1, 2)) + rng.choice(COUNTRY_ENDINGS)
            if self._ok(cand):
                self.used.add(cand)
                return cand.capitalize()

    def variant(self, rng: random.Random, word: str, tries: int = 24) -> str | None:
        """A new unique word one letter off ``word`` (one vowel swapped), or ``None``.

        >>> maker = NameMaker()
        >>> v = maker.variant(random.Random(0), "Tarkin")
        >>> len(v) == 6 and v != "Tarkin" and sum(a != b for a, b in zip(v, "Tarkin")) == 1
        True
        """
        low = word.lower()
        spots = [i for i, ch in enumerate(low) if ch in SINGLE_VOWELS]
        for _ in range(tries):
            if not spots:
                return None
            i = rng.choice(spots)
            new = rng.choice([v for v in SINGLE_VOWELS if v != low[i]])
            cand = low[:i] + new + low[i + 1 :]
            if self._ok(cand):
                self.used.add(cand)
                return cand.capitalize()
        return None
