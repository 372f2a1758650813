"""Captions for text-conditioned training, made from class labels with varied templates.

For MNIST the digit can be named as a word or a numeral ("nine", "9", "a handwritten nine",
"the digit 9", "number nine", ...); other datasets use their class names in generic templates.
"""

from __future__ import annotations

import random

from training.data import MNIST_CLASSES

DIGIT_TEMPLATES = (
    "{word}", "{digit}", "a handwritten {word}", "the digit {digit}", "number {word}", "the number {word}",
    "a {word}", "digit {word}", "a picture of a {word}", "handwritten digit {digit}", "the digit {word}",
    "a drawing of the number {digit}", "{word} written by hand", "an image of a {digit}",
)
GENERIC_TEMPLATES = (
    "{name}", "a {name}", "a photo of a {name}", "a picture of a {name}", "an image of a {name}",
    "a {name}, centred", "the {name}",
)


def caption_for(label: int, class_names: tuple[str, ...], rng: random.Random) -> str:
    """One random caption naming class ``label``."""
    if tuple(class_names) == MNIST_CLASSES:
        return rng.choice(DIGIT_TEMPLATES).format(word=class_names[label], digit=label)
    name = class_names[label].lower()
    return rng.choice(GENERIC_TEMPLATES).format(name=name)


def all_captions(label: int, class_names: tuple[str, ...]) -> list[str]:
    """Every template filled for ``label`` (used by tests and evaluation)."""
    if tuple(class_names) == MNIST_CLASSES:
        return [t.format(word=class_names[label], digit=label) for t in DIGIT_TEMPLATES]
    return [t.format(name=class_names[label].lower()) for t in GENERIC_TEMPLATES]
