"""Multiple-choice tasks whose data the project generates, each probing something attention heads do.

- induction: a random sequence of common words, then its start again; which word comes next (copying).
- ioi: indirect-object identification, "When Mary and John went to the shop, John gave a book to" -> Mary.
- successor: the next item of a well-known sequence (days, months, number words, letters, numbers).

Each generator is deterministic in `seed` and returns documents `{"context", "choices", "label"}`.
"""

from __future__ import annotations

import random
from typing import Any

WORDS = (
    "apple river stone garden window candle forest silver mountain paper village winter doctor letter market "
    "horse castle bottle mirror island planet ribbon hammer jacket kitten ladder meadow needle orange pencil "
    "rabbit saddle tiger violin wagon basket cherry dragon engine feather guitar harbor iron jungle kettle "
    "lemon marble nickel ocean pepper quilt rocket sugar tunnel umbrella valley walnut yellow zebra anchor "
    "bridge cotton desert"
).split()
NAMES = (
    "Mary John Alice Tom Sarah James Emma David Laura Peter Anna Mark Lucy Paul Kate Simon Rachel George Helen "
    "Daniel Susan Robert Julia Michael Claire Henry Sophie Edward Grace Victor"
).split()
PLACES = "store park station school office garden market library beach hospital kitchen museum".split()
OBJECTS = "book drink ball letter key ring flower bag hat cake gift pen".split()
IOI_TEMPLATES = (
    "When {first} and {second} went to the {place}, {subject} gave a {object} to",
    "After {first} and {second} arrived at the {place}, {subject} handed the {object} to",
    "{first} and {second} spent the day at the {place}. Later, {subject} passed the {object} to",
    "While {first} and {second} were working at the {place}, {subject} decided to give the {object} to",
    "Then, {first} and {second} had a long talk at the {place}. {subject} showed the {object} to",
)
SEQUENCES: dict[str, tuple[tuple[str, ...], bool]] = {
    "days": (("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"), True),
    "months": (
        (
            "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
            "November", "December",
        ),
        True,
    ),
    "number_words": (
        (
            "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
            "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
        ),
        False,
    ),
    "letters": (tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), False),
    "numbers": (tuple(str(i) for i in range(1, 61)), False),
}


def _shuffled_choices(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def induction_docs(num_docs: int = 400, seed: int = 1234, length: int = 10) -> list[dict[str, Any]]:
    """Random word sequences repeated from their start; the answer continues the repeat. The three distractors
    also occur in the context, so only copying the earlier continuation gets it right."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sequence = rng.sample(WORDS, length)
        prefix = rng.randint(2, length - 2)
        answer = sequence[prefix]
        distractors = rng.sample([w for w in sequence if w not in (answer, sequence[prefix - 1])], 3)
        choices, label = _shuffled_choices(rng, answer, distractors)
        docs.append({"context": " ".join(sequence + sequence[:prefix]), "choices": choices, "label": label})
    return docs


def ioi_docs(num_docs: int = 400, seed: int = 1234) -> list[dict[str, Any]]:
    """Two people are introduced, one of them (the subject) is named again and gives something: to the other."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        indirect, subject = rng.sample(NAMES, 2)
        first, second = (indirect, subject) if rng.random() < 0.5 else (subject, indirect)
        context = rng.choice(IOI_TEMPLATES).format(
            first=first, second=second, subject=subject, place=rng.choice(PLACES), object=rng.choice(OBJECTS)
        )
        choices, label = _shuffled_choices(rng, indirect, [subject])
        docs.append({"context": context, "choices": choices, "label": label})
    return docs


def successor_docs(num_docs: int = 400, seed: int = 1234) -> list[dict[str, Any]]:
    """A few consecutive items of a well-known sequence; the answer is the next one, the distractors other items
    of the same sequence (never the last one shown)."""
    rng = random.Random(seed)
    names = sorted(SEQUENCES)
    docs = []
    for _ in range(num_docs):
        items, cyclic = SEQUENCES[rng.choice(names)]
        shown = rng.randint(3, 5)
        last_start = len(items) - 1 if cyclic else len(items) - shown - 1
        start = rng.randint(0, last_start)
        window = [items[(start + i) % len(items)] for i in range(shown + 1)]
        answer = window[-1]
        distractors = rng.sample([item for item in items if item not in (answer, window[-2])], 3)
        choices, label = _shuffled_choices(rng, answer, distractors)
        docs.append({"context": ", ".join(window[:-1]) + ",", "choices": choices, "label": label})
    return docs


def text_chunks(documents: list[str], chunk_chars: int = 2000, max_chunks: int | None = None) -> list[str]:
    """Split documents into chunks of about `chunk_chars` characters at line breaks, interleaved across
    documents (first chunk of each, then second of each, ...) so that a prefix samples every document."""
    per_document = []
    for document in documents:
        chunks, current = [], ""
        for line in document.splitlines(keepends=True):
            if current and len(current) + len(line) > chunk_chars:
                chunks.append(current)
                current = ""
            current += line
        if current.strip():
            chunks.append(current)
        per_document.append([chunk.strip() for chunk in chunks if chunk.strip()])
    rounds = max(map(len, per_document), default=0)
    interleaved = [chunks[i] for i in range(rounds) for chunks in per_document if i < len(chunks)]
    return interleaved if max_chunks is None else interleaved[:max_chunks]


__all__ = ["induction_docs", "ioi_docs", "successor_docs", "text_chunks"]
