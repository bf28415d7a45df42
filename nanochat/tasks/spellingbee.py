"""
Letter counting ("How many r are in strawberry?") and spelling, in nanochat's SpellingBee style:
the assistant spells the word out, counts by hand, then checks with a calculator call
'strawberry'.count('r') and ends with "#### 3". Graded by the final number.

Needs an English word list: dwyl/english-words' words_alpha.txt (one lowercase word per line), or
the words_alpha.zip that holds it, at data/tasks/spellingbee/ in the store. Examples are generated
from the index with a seeded RNG, so any size works; train and test use disjoint seeds.
"""
from __future__ import annotations

import io
import random
import string
import zipfile

from nanochat.tasks.base import Task, evaluate_final_answer
from nanochat.tasks.files import require_files, resolve_store

SPLIT_SEED_OFFSETS = {"train": 0, "val": 5_000_000, "test": 10_000_000}  # > word count: no seed overlap

USER_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "What is the count of {letter} in {word}",
    "{word} has how many {letter}",
]


def load_words(store) -> list[str]:
    store = resolve_store(store)
    key = require_files(store, "spellingbee", ["words_alpha.txt", "words_alpha.zip", "*.txt"], "spellingbee")[0]
    data = store.get_bytes(key)
    if key.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            data = archive.read("words_alpha.txt")
    words = [w.strip() for w in data.decode("utf-8").splitlines()]  # the file has \r\n endings
    return [w for w in words if w.isalpha()]


def spelling_bee_conversation(word: str, letter: str, rng: random.Random) -> dict:
    count = word.count(letter)
    quote_letter, quote_word = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
    question = rng.choice(USER_TEMPLATES).format(letter=f"{quote_letter}{letter}{quote_letter}", word=f"{quote_word}{word}{quote_word}")
    if rng.random() < 0.3:
        question = question.lower()
    if rng.random() < 0.5:
        question += "?"
    manual = f"We are asked to count the letter '{letter}' in the word '{word}'. Let me spell it out first:\n{word}:{','.join(word)}\n\nThen count the '{letter}':\n"
    running = 0
    for i, char in enumerate(word, 1):
        if char == letter:
            running += 1
            manual += f"{i}:{char} hit! count={running}\n"  # no space before the letter: same token as in the spelling
        else:
            manual += f"{i}:{char}\n"
    manual += f"\nThis gives us {running}.\n\nLet me double check with Python:\n\n"
    parts = [
        {"type": "text", "text": manual},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


class SpellingBee(Task):
    def __init__(self, store=None, split: str = "train", size: int = 1000, words: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLIT_SEED_OFFSETS:
            raise ValueError(f"SpellingBee split must be one of {tuple(SPLIT_SEED_OFFSETS)}, got {split!r}")
        self.split, self.size = split, size
        self.words = words if words is not None else load_words(store)

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(SPLIT_SEED_OFFSETS[self.split] + index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        return spelling_bee_conversation(word, letter, rng)

    def evaluate(self, conversation, completion):
        return evaluate_final_answer(conversation, completion)


class SimpleSpelling(Task):
    """Just spelling words ("Spell the word: apple" -> "apple:a,p,p,l,e"): the hard part of counting."""

    def __init__(self, store=None, split: str = "train", size: int = 1000, words: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLIT_SEED_OFFSETS:
            raise ValueError(f"SimpleSpelling split must be one of {tuple(SPLIT_SEED_OFFSETS)}, got {split!r}")
        self.split, self.size = split, size
        self.words = list(words if words is not None else load_words(store))
        random.Random(42).shuffle(self.words)  # a different word order than SpellingBee

    def num_examples(self):
        return self.size

    def get_example(self, index):
        word = random.Random(SPLIT_SEED_OFFSETS[self.split] + index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}
