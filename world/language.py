"""The shapes world's prompt language: what a caption asks for (`Spec`), written from templates
(`Spec.text`) and read back from any prompt (`parse`).

A caption is a list of clauses joined by commas and a final "and"; a clause is a noun phrase
("two small red circles"), optionally followed by a relation and a second noun phrase ("to the
left of a blue square") or by a position ("on the left"). A relation binds only the two phrases
beside it. `parse` scans for noun phrases and ignores the words it does not know, so an enhanced
prompt ("a red circle to the left of a blue square, flat colours, plain background") reads as
the caption inside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from random import Random

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
POSITIONS = ("left", "right", "top", "bottom")

# How each is written: the first form is the canonical one, the others are synonyms the
# templates also use and the parser reads.
_RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_POSITION_WORDS = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_COUNT_WORDS = {1: ("a", "an", "one", "single", "the"), 2: ("two",), 3: ("three",), 4: ("four",)}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_PREFIXES = ("", "", "a picture of ", "an image of ")


@dataclass(frozen=True)
class Phrase:
    """A noun phrase: `count` objects of `shape`, each of `colour` (None: any colour) and of
    `size` (None: any size)."""

    shape: str
    colour: str | None = None
    count: int = 1
    size: str | None = None

    def text(self, rng: Random | None = None) -> str:
        words = [_pick(_COUNT_WORDS[self.count], rng) if self.count > 1 else ""]
        if self.size:
            words.append(_pick(_SIZE_WORDS[self.size], rng))
        if self.colour:
            words.append(self.colour)
        words.append(_PLURAL[self.shape] if self.count > 1 else self.shape)
        if self.count == 1:
            words[0] = "an" if words[1][0] in "aeiou" else "a"
        return " ".join(words)


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: its phrases, the relations between them (`(i, relation, j)`:
    phrase i is `relation` phrase j) and positions (`(i, position)`)."""

    phrases: tuple[Phrase, ...]
    relations: tuple[tuple[int, str, int], ...] = ()
    positions: tuple[tuple[int, str], ...] = field(default=())

    def text(self, rng: Random | None = None) -> str:
        """The caption, from the templates; with `rng`, synonyms and a prefix drawn from it."""
        related = {i: (rel, j) for i, rel, j in self.relations}
        placed = dict(self.positions)
        clauses, done = [], set()
        for i, phrase in enumerate(self.phrases):
            if i in done:
                continue
            clause = phrase.text(rng)
            if i in related:
                rel, j = related[i]
                clause += f" {_pick(_RELATION_WORDS[rel], rng)} {self.phrases[j].text(rng)}"
                done.add(j)
            elif i in placed:
                clause += f" {_pick(_POSITION_WORDS[placed[i]], rng)}"
            clauses.append(clause)
        body = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + f" and {clauses[-1]}"
        return _pick(_PREFIXES, rng) + body


def _pick(options: tuple[str, ...], rng: Random | None) -> str:
    return rng.choice(options) if rng is not None else options[0]


# --- parsing --------------------------------------------------------------------------------------
def _alternatives(words: dict) -> str:
    forms = sorted((f for fs in words.values() for f in fs), key=len, reverse=True)
    return "|".join(re.escape(f) for f in forms if f)


_NOUN = (
    rf"\b(?:(?P<count>{_alternatives(_COUNT_WORDS)})\s+)?"
    rf"(?:(?P<size>{_alternatives(_SIZE_WORDS)})\s+)?"
    rf"(?:(?P<colour>{'|'.join(COLOURS)})\s+)?"
    rf"(?P<shape>{'|'.join(SHAPES)})(?P<plural>s)?\b"
)
_NOUN_RE = re.compile(_NOUN)
_RELATION_RE = re.compile(rf"^\W*(?:is\s+|are\s+)?({_alternatives(_RELATION_WORDS)})\W*$")
_POSITION_RE = re.compile(rf"\b({_alternatives(_POSITION_WORDS)})\b")


def _lookup(words: dict, text: str) -> object:
    return next(key for key, forms in words.items() if text in forms)


def parse(prompt: str) -> Spec:
    """The spec a prompt states. A relation is read between two consecutive noun phrases when
    the words between them are one relation; a position from the words after a phrase up to
    the next one. ValueError when the prompt names no shape."""
    text = prompt.lower()
    matches = list(_NOUN_RE.finditer(text))
    if not matches:
        raise ValueError(
            f"prompt {prompt[:60]!r} names no shape of the shapes world ({', '.join(SHAPES)})"
        )
    phrases: list[Phrase] = []
    for m in matches:
        count = int(_lookup(_COUNT_WORDS, m["count"])) if m["count"] else (2 if m["plural"] else 1)
        size = str(_lookup(_SIZE_WORDS, m["size"])) if m["size"] else None
        phrases.append(Phrase(m["shape"], m["colour"], count, size))
    relations, positions = [], []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        between = text[m.end() : end]
        if i + 1 < len(matches) and (r := _RELATION_RE.match(between)):
            relations.append((i, str(_lookup(_RELATION_WORDS, r[1])), i + 1))
        elif p := _POSITION_RE.search(between):
            positions.append((i, str(_lookup(_POSITION_WORDS, p[1]))))
    return Spec(tuple(phrases), tuple(relations), tuple(positions))
