"""Caption templates and paraphrases for the scene world."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

from k3lab.data.scene_spec import Scene, SceneObject

T = TypeVar("T")

SHAPE_WORDS: dict[str, list[tuple[str, str]]] = {  # (singular, plural)
    "circle": [("circle", "circles"), ("disk", "disks")],
    "square": [("square", "squares"), ("box", "boxes")],
    "triangle": [("triangle", "triangles")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
}
SIZE_WORDS: dict[str, list[str]] = {"small": ["small", "little"], "large": ["large", "big"]}
RELATION_WORDS: dict[str, list[str]] = {
    "left of": ["to the left of", "left of", "on the left of"],
    "right of": ["to the right of", "right of", "on the right of"],
    "above": ["above", "over", "on top of"],
    "below": ["below", "under", "beneath"],
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def object_phrase(rng: np.random.Generator, obj: SceneObject, with_size: bool | None = None) -> str:
    """'a big red circle' / 'a red disk'."""
    noun = _pick(rng, SHAPE_WORDS[obj.shape])[0]
    if with_size is None:
        with_size = bool(rng.random() < 0.5)
    size = f"{_pick(rng, SIZE_WORDS[obj.size])} " if with_size else ""
    return f"a {size}{obj.color} {noun}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_for(rng: np.random.Generator, scene: Scene) -> str:
    """One caption, drawn from the templates of the scene's kind."""
    objs = scene.objects
    if scene.kind == "single":
        phrase = object_phrase(rng, objs[0])
        template = _pick(
            rng, ["{o}", "{o} on a plain background", "an image of {o}", "a picture showing {o}", "there is {o}"]
        )
        return template.format(o=phrase)
    if scene.kind == "relation":
        rel = scene.relations[0]
        a, b = object_phrase(rng, objs[rel["subject"]]), object_phrase(rng, objs[rel["object"]])
        words = _pick(rng, RELATION_WORDS[rel["relation"]])
        template = _pick(rng, ["{a} {r} {b}", "{a} is {r} {b}", "there is {a} {r} {b}"])
        return template.format(a=a, r=words, b=b)
    if scene.kind == "count":
        assert scene.count is not None
        n, obj = scene.count["n"], objs[0]
        number = NUMBER_WORDS[n] if rng.random() < 0.7 else str(n)
        plural = _pick(rng, SHAPE_WORDS[obj.shape])[1]
        size = f"{_pick(rng, SIZE_WORDS[obj.size])} " if rng.random() < 0.4 else ""
        template = _pick(rng, ["{n} {s}{c} {p}", "a group of {n} {s}{c} {p}", "exactly {n} {s}{c} {p}"])
        return template.format(n=number, s=size, c=obj.color, p=plural)
    if scene.kind == "multi":
        ordered = sorted(objs, key=lambda o: o.x)
        phrases = [object_phrase(rng, o) for o in ordered]
        if rng.random() < 0.5:
            return "from left to right: " + _join(phrases)
        order = rng.permutation(len(phrases))
        return _join([phrases[i] for i in order])
    raise ValueError(f"unknown scene kind {scene.kind!r}")


TEMPLATE_WORDS = (
    "a an is there on plain background image of picture showing group exactly from left to right and the top over under"
).split()


def caption_vocabulary() -> list[str]:
    """Every word (and punctuation mark) a scene-world caption can contain, sorted: the vocabulary of the
    embedded default's offline word-level tokenizer."""
    from k3lab.data.scene_spec import COLORS

    words = set(TEMPLATE_WORDS) | set(COLORS) | {",", ":"} | {str(n) for n in NUMBER_WORDS} | set(NUMBER_WORDS.values())
    for phrases in (*SHAPE_WORDS.values(),):
        for singular, plural in phrases:
            words |= set(singular.split()) | set(plural.split())
    for options in (*SIZE_WORDS.values(), *RELATION_WORDS.values()):
        for phrase in options:
            words |= set(phrase.split())
    return sorted(words)
