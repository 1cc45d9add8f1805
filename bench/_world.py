"""Toy-world material for the quality bench: the personal concepts, their photos, the prompts,
and judging generated images with the attribute probe.

A concept is a patterned two-tone object with a tilt (a diagonally striped blue-on-red star):
its shape is the class word; its main colour, pattern and second colour are its named look
(words can say them, but the bench learns from template captions, "a photo of a <tok> star", so
the token has to take them); its tilt is what no word of the world says. Concept fidelity asks
the probe for the named look (shape, colour, pattern, second colour) and, separately, for the
tilt. Concepts of one run get distinct shapes six at a time (c1-c6 differ, c7-c12 differ, ...),
so the concepts composed in pairs are never mistaken for one another.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cns_daemon.toyworld.world import (BACKGROUND_PHRASE, BACKGROUNDS, COLORS, NAMED_LOOK, PATTERNS,
                                       SHAPES, TILTS, UNNAMED, ObjectSpec, render_concept_photos)


@dataclass(frozen=True)
class Concept:
    name: str
    obj: ObjectSpec
    photos: tuple[Path, ...]
    captions: tuple[str, ...]

    @property
    def class_word(self) -> str:
        return self.obj.shape


CAPTIONS = ("none", "background")   # what the photos' sidecar captions say (bench --captions)


def make_concepts(n: int, photos: int, seed: int, folder: Path, captions: str = "none") -> list[Concept]:
    """`n` patterned objects with `photos` rendered photos each, written as PNGs to `folder`.
    With `captions` "background" each photo gets a sidecar caption that says its scene and
    nothing of the look ("a photo of a star in the snow"), as a person might write."""
    if captions not in CAPTIONS:
        raise ValueError(f"captions must be one of {', '.join(CAPTIONS)}")
    rng = np.random.default_rng(seed)
    # Every six in a row are the six shapes (a shuffle each): the first six, which the pairs
    # compose, differ in shape in a run of any length. (One shuffle of max(n, 6) numbers, each
    # taken modulo 6, did that only up to six: a 20-concept run's c1-c6 repeated shapes, and a
    # pair of one shape left placement nothing to tell apart. Six or fewer draw as before.)
    blocks = [rng.permutation(len(SHAPES)) for _ in range(-(-n // len(SHAPES)))]
    shapes = [SHAPES[i] for block in blocks for i in block][:n]
    patterns = [p for p in PATTERNS if p != "solid"]
    out = []
    for i, shape in enumerate(shapes):
        color, second = (COLORS[j] for j in rng.choice(len(COLORS), 2, replace=False))
        obj = ObjectSpec(shape, color, patterns[int(rng.integers(len(patterns)))], second,
                         TILTS[int(rng.integers(len(TILTS)))])
        name = f"c{i + 1}"
        paths, caps = [], []
        rendered = render_concept_photos(obj, photos, seed * 100 + i)
        # the same photos, captioned by where they were taken only ("a photo of a star in the snow")
        wheres = render_concept_photos(obj, photos, seed * 100 + i, look="none", with_color=False)
        for k, ((img, cap), (_, where)) in enumerate(zip(rendered, wheres)):
            path = folder / f"{name}-{k}.png"
            img.save(path)
            if captions == "background":
                path.with_suffix(".txt").write_text(where + "\n")
            paths.append(path)
            caps.append(cap)
        out.append(Concept(name, obj, tuple(paths), tuple(caps)))
    return out


def concept_prompt(concept: Concept, background: str | None = None) -> str:
    if background is None:
        return f"a photo of <{concept.name}>"
    return f"a photo of <{concept.name}> {BACKGROUND_PHRASE[background]}"


def class_prompt(concept: Concept) -> str:
    """The same request without the concept: what the base model draws for the class word."""
    return f"a photo of a {concept.class_word}"


def prompt_background(index: int) -> str:
    """The background asked for in concept i's prompt-fidelity prompt (never plain white)."""
    coloured = [b for b in BACKGROUNDS if b != "white"]
    return coloured[index % len(coloured)]


def pairs(concepts: list[Concept]) -> list[tuple[Concept, Concept]]:
    """Disjoint pairs (1, 2), (3, 4), ... for the two-concept prompts (at most three)."""
    return [(concepts[i], concepts[i + 1]) for i in range(0, min(len(concepts), 6) - 1, 2)]


PAIR_PROMPT = "a photo of <{a}> and <{b}> on the grass"
LEFT_BOX, RIGHT_BOX = "0,0,0.5,1", "0.5,0,1,1"


class Judge:
    """Rates generated images with the toy-world attribute probe."""

    def __init__(self, probe=None):
        if probe is None:
            from cns_daemon.toyworld.probe import Probe

            probe = Probe.load()
        self.probe = probe

    def concept_rate(self, images, obj: ObjectSpec) -> float:
        """The named look: shape, colour, pattern and second colour all as the concept's."""
        return _rate(a.matches(obj, attrs=NAMED_LOOK) for a in self.probe.read(images))

    def unnamed_rate(self, images, obj: ObjectSpec) -> float:
        """The look no word says (the pattern's tilt), over all images (chance 1/2 of the
        patterned ones)."""
        return _rate(a.matches(obj, attrs=UNNAMED) for a in self.probe.read(images))

    def background_rate(self, images, background: str) -> float:
        return _rate(a.background == background for a in self.probe.read(images))

    def composition_rate(self, images, left: ObjectSpec, right: ObjectSpec) -> float:
        """Both concepts right and in their halves: the left half reads as the left concept's
        named look and the right half as the right one's."""
        return _rate(la.matches(left, attrs=NAMED_LOOK) and ra.matches(right, attrs=NAMED_LOOK)
                     for la, ra in self.probe.read_halves(images))

    def placement_rate(self, images, left: ObjectSpec, right: ObjectSpec) -> float:
        """Both objects in their halves: the left half reads as the left concept's shape and the
        right half as the right one's (shape only: placement is about where, not how well)."""
        return _rate(la.shape == left.shape and ra.shape == right.shape
                     for la, ra in self.probe.read_halves(images))


def _rate(hits) -> float:
    hits = list(hits)
    return sum(map(bool, hits)) / len(hits) if hits else 0.0
