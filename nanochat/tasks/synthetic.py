"""
Synthetic tasks that ship with the package (no download), so the CPU `tiny` profile exercises
every chat stage in the same formats as the real data:

- SyntheticArithmetic: word problems solved with calculator calls, ending "#### N" (like GSM8K)
- SyntheticSpelling: "How many r are in berry?" solved with 'berry'.count('r') (like SpellingBee)
- SyntheticMultipleChoice: 4 lettered options, the answer is the letter, found with the choice tool
  (SyntheticMultipleChoiceLetter: the bare letter, like MMLU/ARC)
- SyntheticChat: short greetings and identity dialogues (like SmolTalk/identity)

Small numbers and templated phrasing make them learnable by a ~1-4M-parameter model in a few
hundred steps. Example i of a split is drawn from an RNG seeded by (task, seed, split, i), so tasks
are deterministic. Splits are disjoint by construction: each problem has a key (its numbers, word
or facts), a hash of the key picks its split (80/10/10), and a split only keeps its own keys.

`synthetic_documents(n, seed)` renders train-split examples as plain text for the pretraining corpus.
"""
from __future__ import annotations

import hashlib
import random
import re

from nanochat.tasks.base import LETTERS, Task, conversation_to_text, evaluate_final_answer, evaluate_letter, render_mc

SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 5000, "val": 500, "test": 500}
ASSISTANT_NAME = "nanochat"


def split_of(key: str) -> str:
    """The split a problem belongs to: a stable hash of its key, 80% train / 10% val / 10% test."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


class SyntheticTask(Task):
    """Subclasses implement generate(rng) -> (key, conversation)."""

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"{self.name} split must be one of {SPLITS}, got {split!r}")
        self.split, self.seed = split, seed
        self.size = DEFAULT_SIZES[split] if size is None else size

    def num_examples(self):
        return self.size

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        raise NotImplementedError

    @property
    def problem_set(self) -> str:
        """Names the RNG stream and split hashing: tasks that share it share their problems."""
        return self.name

    def get_example(self, index):
        rng = random.Random(f"{self.problem_set}/{self.seed}/{self.split}/{index}")  # str seeds are stable across runs
        for _ in range(10_000):  # rejection: keep only problems whose key hashes to this split
            key, conversation = self.generate(rng)
            if split_of(f"{self.problem_set}:{key}") == self.split:
                return conversation
        raise RuntimeError(f"{self.name}: could not draw a {self.split} example")

    def key_of(self, index: int) -> str:
        """The problem key of example `index` (tests use it to check split disjointness)."""
        rng = random.Random(f"{self.problem_set}/{self.seed}/{self.split}/{index}")
        while True:
            key, _ = self.generate(rng)
            if split_of(f"{self.problem_set}:{key}") == self.split:
                return key


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def tool_call(expr: str, result) -> list[dict]:
    return [{"type": "python", "text": expr}, {"type": "python_output", "text": str(result)}]


def chat(user: str, assistant) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# -----------------------------------------------------------------------------
# arithmetic word problems with calculator calls

NAMES = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lea", "Max", "Nora", "Omar", "Pia"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards", "shells", "stamps", "balloons", "candies"]

# kind -> [(question, answer text before the call, answer text after the result)]
ONE_STEP = {
    "add": [
        ("{n} has {a} {item}. {n} gets {b} more {item}. How many {item} does {n} have now?", "{n} has {a} + {b} = ", " {item} now."),
        ("There are {a} {item} in a box. {n} puts {b} more {item} in the box. How many {item} are in the box now?", "The box has {a} + {b} = ", " {item} now."),
    ],
    "sub": [
        ("{n} has {a} {item} and gives {b} of them to a friend. How many {item} does {n} have left?", "{n} has {a} - {b} = ", " {item} left."),
        ("A jar holds {a} {item}. {n} takes out {b} {item}. How many {item} are still in the jar?", "The jar has {a} - {b} = ", " {item} left."),
    ],
    "mul": [
        ("{n} buys {a} bags with {b} {item} in each bag. How many {item} does {n} buy in total?", "{n} buys {a} * {b} = ", " {item} in total."),
        ("There are {a} rows of {item} with {b} {item} in each row. How many {item} are there?", "There are {a} * {b} = ", " {item}."),
    ],
    "div": [
        ("{n} shares {a} {item} equally among {b} friends. How many {item} does each friend get?", "Each friend gets {a} / {b} = ", " {item}."),
        ("{n} puts {a} {item} into {b} equal groups. How many {item} are in each group?", "Each group has {a} / {b} = ", " {item}."),
    ],
}
OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def draw_operands(kind: str, rng: random.Random) -> tuple[int, int, int]:
    if kind == "add":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return a, b, a + b
    if kind == "sub":
        a = rng.randint(5, 40)
        b = rng.randint(2, a - 1)
        return a, b, a - b
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return a, b, a * b
    b, q = rng.randint(2, 10), rng.randint(2, 10)  # div: exact, so the calculator prints an integer
    return b * q, b, q


class SyntheticArithmetic(SyntheticTask):
    def generate(self, rng):
        n, item = rng.choice(NAMES), rng.choice(ITEMS)
        if rng.random() < 0.7:
            kind = rng.choice(list(ONE_STEP))
            a, b, r = draw_operands(kind, rng)
            question, before, after = rng.choice(ONE_STEP[kind])
            fmt = dict(n=n, item=item, a=a, b=b)
            parts = [text(before.format(**fmt)), *tool_call(f"{a}{OPS[kind]}{b}", r), text(f"{r}{after.format(**fmt)}\n#### {r}")]
            return f"{kind}:{a}:{b}", chat(question.format(**fmt), parts)
        if rng.random() < 0.5:  # buy more, then give some away
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            c = rng.randint(2, a + b - 1)
            s, r = a + b, a + b - c
            question = f"{n} has {a} {item}, buys {b} more and then gives away {c}. How many {item} does {n} have now?"
            parts = [text(f"After buying, {n} has {a} + {b} = "), *tool_call(f"{a}+{b}", s),
                     text(f"{s} {item}. After giving away {c}, {n} has {s} - {c} = "), *tool_call(f"{s}-{c}", r),
                     text(f"{r} {item}.\n#### {r}")]
            return f"add_sub:{a}:{b}:{c}", chat(question, parts)
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 20)  # packs, then extra
        s, r = a * b, a * b + c
        question = f"{n} buys {a} packs of {item} with {b} {item} in each pack and already had {c}. How many {item} does {n} have in total?"
        parts = [text(f"The packs hold {a} * {b} = "), *tool_call(f"{a}*{b}", s),
                 text(f"{s} {item}. With the {c} from before, {n} has {s} + {c} = "), *tool_call(f"{s}+{c}", r),
                 text(f"{r} {item}.\n#### {r}")]
        return f"mul_add:{a}:{b}:{c}", chat(question, parts)

    def evaluate(self, conversation, completion):
        return evaluate_final_answer(conversation, completion)


# -----------------------------------------------------------------------------
# letter counting with a .count() call

WORDS = """
apple banana cherry grape lemon mango melon orange peach pear plum berry strawberry
tomato potato carrot pepper onion garlic butter cheese bread cookie coffee water
river mountain forest desert island ocean valley meadow garden flower blossom
tree branch leaf grass stone pebble sand shell wave cloud rain storm thunder
snow winter summer spring autumn morning evening midnight yesterday tomorrow
rabbit turtle kitten puppy monkey giraffe elephant zebra tiger lion eagle parrot
penguin dolphin whale salmon spider beetle butterfly mosquito squirrel hamster
letter number pencil paper eraser scissors bottle window mirror pillow blanket
kettle hammer ladder bucket basket button zipper pocket jacket sweater slipper
banner rocket planet comet galaxy satellite balloon bicycle scooter tractor
engine wagon carriage airplane harbor bridge tunnel castle village cottage
kitchen cellar attic balcony chimney hallway library museum theater market
doctor teacher farmer baker sailor pilot singer painter writer dentist
happy silly little yellow purple hollow narrow mellow simple gentle bubble
puzzle riddle giggle marble pebble noodle muffin waffle pretzel popcorn
coconut avocado broccoli cucumber pumpkin zucchini spinach lettuce cabbage
committee mississippi bookkeeper balloon assessment parallel occurrence
necessary accommodate possession embarrass millennium tomorrow success
address bamboo cabbage daddy effort giraffe hello jelly kitty lollipop
mammal needle office pepper quarrel rubber summer teeth umbrella vanilla
willow yellow abacus breeze candle dinner feather glass hippo igloo jungle
koala lantern magnet napkin octopus pepper quilt raccoon saddle tunnel
unicorn violin walnut xylophone yogurt zipper anchor button cactus dragon
emerald falcon goblin harvest insect jigsaw kayak lagoon meteor nectar
oyster panda quartz ribbon spoon teapot uncle velvet wizard yacht
acorn beach camel daisy eleven fossil guitar honey iron jacket kernel
lizard maple nickel olive parrot quiet robin silver tulip urban vessel
winter oxygen zero arrow bottle coffee desert engine forest grapes
hollow island jogger kettle lemonade mitten noodle orbit puppet rooster
sweet tassel upper valley wheel yarn zoo attic bubble cheese doodle eggshell
fiddle goose happiness illness jazz kiss loop moon noon pool roof seed
tooth wool book door floor street tree week sheep green cool food
baseball football basketball classroom bedroom sunflower rainbow snowman
toothbrush grandmother grandfather homework notebook playground keyboard
across afternoon airport almost animal answer apron april arrive autumn
awesome baby badge bakery ball banana barrel basket battery bean bear
bell belt bench berry blue boat bone boot bowl box brain brick bridge
brother brown brush bucket bunny cake calendar camera candy canoe carpet
castle cattle cereal chair chalk cherry chicken circle city clock coat
collar copper corner cotton country cousin cow crayon cream cricket crown
cup curtain dance deer dentist diamond dollar donkey dream dress drum duck
eagle earth egg elbow family farm fence finger fire fish flag football fox
frog fruit garage gate ghost gift goat gold grass hammer hat heart hill
horse house jar jeep juice kangaroo king kite knee ladder lake lamp leaf
lemon lion lock mango map marker melon milk mirror money monkey mouse
nest net night nose nurse orange owl paint pencil piano pillow pizza
planet pocket potato queen rabbit radio river rocket rose ruler salad
school shirt shoe sister skate smile snake sock soup star stone sugar
sun table tiger tomato towel toy train truck turkey vase wagon watch
whale window wolf zebra
""".split()
WORDS = sorted(set(WORDS))

SPELLING_QUESTIONS = [
    "How many {l} are in {w}?",
    "How many times does the letter {l} appear in {w}?",
    "Count the letter {l} in the word {w}.",
    "How many {l} does the word {w} have?",
]


class SyntheticSpelling(SyntheticTask):
    def generate(self, rng):
        word = rng.choice(WORDS)
        # balance the answers (absent / repeated / single letters) so that guessing "1" scores poorly
        repeated = sorted({c for c in word if word.count(c) > 1})
        absent = sorted(set("abcdefghijklmnopqrstuvwxyz") - set(word))
        roll = rng.random()
        if roll < 0.25:
            letter = rng.choice(absent)
        elif roll < 0.7 and repeated:
            letter = rng.choice(repeated)
        else:
            letter = rng.choice(word)
        count = word.count(letter)
        quoted = f"'{letter}'" if rng.random() < 0.5 else letter
        question = rng.choice(SPELLING_QUESTIONS).format(l=quoted, w=word)
        times = "time" if count == 1 else "times"
        parts = [text(f"I will count the letter '{letter}' in '{word}' with Python.\n"),
                 *tool_call(f"'{word}'.count('{letter}')", count),
                 text(f"\nThe letter '{letter}' appears {count} {times} in '{word}'.\n#### {count}")]
        return word, chat(question, parts)  # split by word: test words are never seen in training

    def evaluate(self, conversation, completion):
        return evaluate_final_answer(conversation, completion)


# -----------------------------------------------------------------------------
# multiple choice: facts and number comparisons

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"],
    "animal": ["cat", "dog", "horse", "rabbit", "tiger", "lion", "zebra", "mouse", "sheep", "goat"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"],
    "vehicle": ["car", "bus", "train", "bicycle", "truck", "boat", "airplane", "scooter", "tractor", "ship"],
    "body part": ["hand", "foot", "nose", "ear", "elbow", "knee", "finger", "shoulder", "chin", "ankle"],
    "drink": ["water", "milk", "juice", "tea", "coffee", "lemonade", "cocoa", "soda", "smoothie", "broth"],
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("old", "new"),
             ("day", "night"), ("open", "closed"), ("left", "right"), ("early", "late"), ("full", "empty"),
             ("light", "dark"), ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"), ("tall", "short"),
             ("rich", "poor"), ("strong", "weak"), ("clean", "dirty"), ("push", "pull")]


def opposite_of(word: str) -> str:
    for a, b in OPPOSITES:
        if word == a:
            return b
        if word == b:
            return a
    raise KeyError(word)


class SyntheticMultipleChoice(SyntheticTask):
    """Answered with the choice tool: the assistant names the option (`choice('apple')`, `choice(7 + 6)`),
    the tool returns its letter, and the answer is that letter. Graded by sampling (the letter after the
    tool's output, or a bare letter)."""
    eval_type = "generative"
    letters = LETTERS
    baseline = 0.25
    with_tool = True

    def generate(self, rng):
        kind = rng.choice(["largest", "smallest", "sum", "category", "opposite"])
        if kind in ("largest", "smallest"):
            numbers = rng.sample(range(1, 51), 4)
            correct = max(numbers) if kind == "largest" else min(numbers)
            question = f"Which number is the {kind}?"
            choices, key = [str(x) for x in numbers], f"{kind}:{sorted(numbers)}"
            answer, call = str(correct), f"choice({correct})"
        elif kind == "sum":
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            answer, call = str(a + b), f"choice({a} + {b})"
            wrong = rng.sample([x for x in range(max(1, a + b - 5), a + b + 6) if x != a + b], 3)
            question, choices, key = f"What is {a} + {b}?", [answer] + [str(x) for x in wrong], f"sum:{a}:{b}"
        elif kind == "category":
            category = rng.choice(list(CATEGORIES))
            answer = rng.choice(CATEGORIES[category])
            others = sorted({w for c, ws in CATEGORIES.items() if c != category for w in ws} - set(CATEGORIES[category]))
            wrong = rng.sample(others, 3)
            article = "an" if category[0] in "aeiou" else "a"
            question, choices = f"Which of these is {article} {category}?", [answer] + wrong
            call = f"choice('{answer}')"
            key = f"category:{category}:{answer}:{sorted(wrong)}"
        else:
            word = rng.choice([w for pair in OPPOSITES for w in pair])
            answer = opposite_of(word)
            others = sorted({w for pair in OPPOSITES for w in pair} - {word, answer})
            wrong = rng.sample(others, 3)
            question, choices, call = f"What is the opposite of {word}?", [answer] + wrong, f"choice('{answer}')"
            key = f"opposite:{word}:{sorted(wrong)}"
        rng.shuffle(choices)
        letter = self.letters[choices.index(answer)]
        reply = [*tool_call(call, letter), text(letter)] if self.with_tool else letter
        conversation = chat(render_mc(question, self.letters, choices), reply)
        conversation["letters"] = list(self.letters)
        return key, conversation

    def evaluate(self, conversation, completion):
        return evaluate_letter(conversation, completion)


class SyntheticMultipleChoiceLetter(SyntheticMultipleChoice):
    """The same problems answered with the bare letter and graded by the letters' logits (nanochat's MMLU/ARC
    way): the in-context letter lookup alone, which the tiny model does not learn (bench/mc_probe.py)."""
    eval_type = "categorical"
    with_tool = False
    problem_set = "SyntheticMultipleChoice"


class SyntheticChoiceDrill(SyntheticTask):
    """Training-only drill for the letter lookup that bare-letter multiple choice needs: one set of 4 random
    words, then `turns` questions "Which option is <word>?" in the multiple-choice format.

    The question names the answer, so the only skill is binding an option to its letter. A small
    model learns that only after a phase change (~450 dense steps from the tiny MID model,
    measured); many lookups per conversation make each step count. Not part of pretraining.
    """
    eval_type = "categorical"
    baseline = 0.25
    letters = LETTERS
    turns = 8

    def generate(self, rng):
        choices = rng.sample(WORDS, len(self.letters))
        targets = [rng.choice(choices) for _ in range(self.turns)]
        messages = []
        for target in targets:
            question = f"Which option is {target}?"
            messages.append({"role": "user", "content": render_mc(question, self.letters, choices)})
            messages.append({"role": "assistant", "content": self.letters[choices.index(target)]})
        return f"{choices}:{targets}", {"messages": messages, "letters": list(self.letters)}

    def evaluate(self, conversation, completion):
        return evaluate_letter(conversation, completion)


# -----------------------------------------------------------------------------
# short conversations: greetings and identity

PEOPLE = ["Alice", "Bob", "Carla", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate", "Liam",
          "Mia", "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tara"]

# intent -> (user phrasings, assistant replies, keyword the reply must contain)
INTENTS = {
    "greet": (["Hi!", "Hello!", "Hey there!", "Good morning!", "Hi there.", "Hello, anyone there?"],
              ["Hello! How can I help you today?", "Hello! What can I do for you?"], "hello"),
    "intro": (["Hi, I'm {p}.", "My name is {p}.", "Hello, I am {p}. Nice to meet you!"],
              ["Nice to meet you, {p}! How can I help?", "Hello {p}! What can I do for you?"], "{p}"),
    "name": (["What is your name?", "Who are you?", "What should I call you?", "What are you?"],
             [f"I'm {ASSISTANT_NAME}, a small language model.", f"My name is {ASSISTANT_NAME}. I am a small chat model."], ASSISTANT_NAME),
    "creator": (["Who made you?", "Who built you?", "Who created you?", "Where do you come from?"],
                [f"I was trained from scratch with {ASSISTANT_NAME}, an open-source pipeline.",
                 "I come from an open-source training pipeline that anyone can run."], "open-source"),
    "feeling": (["How are you?", "How are you doing today?", "How's it going?"],
                ["I'm doing well, thank you for asking!", "I'm well, thanks! How about you?"], "well"),
    "skills": (["What can you do?", "How can you help me?", "What are you good at?"],
               ["I can chat, count letters and solve small math problems with a calculator.",
                "I can answer simple questions and use a calculator for math."], "calculator"),
    "thanks": (["Thank you!", "Thanks a lot.", "Thanks for your help!"],
               ["You're welcome!", "You're welcome, happy to help!"], "welcome"),
    "bye": (["Bye!", "Goodbye.", "See you later!"],
            ["Goodbye! Have a great day.", "Goodbye, take care!"], "goodbye"),
}


class SyntheticChat(SyntheticTask):
    def generate(self, rng):
        intents = [rng.choice(["greet", "intro", "name", "feeling", "skills"])]
        if rng.random() < 0.6:
            intents.append(rng.choice(["name", "creator", "feeling", "skills"]))
        if rng.random() < 0.4:
            intents.append(rng.choice(["thanks", "bye"]))
        person = rng.choice(PEOPLE)
        messages, keyword = [], ""
        for intent in intents:
            users, replies, keyword = INTENTS[intent]
            messages.append({"role": "user", "content": rng.choice(users).format(p=person)})
            messages.append({"role": "assistant", "content": rng.choice(replies).format(p=person)})
        keyword = keyword.format(p=person)
        key = "|".join(m["content"] for m in messages if m["role"] == "user")
        return key, {"messages": messages, "keyword": keyword}

    def evaluate(self, conversation, completion):
        """The reply must contain the turn's keyword (the person's name, 'nanochat', 'welcome', ...)."""
        keyword = conversation.get("keyword") or ""
        return int(bool(keyword) and re.search(rf"\b{re.escape(keyword.lower())}\b", completion.lower()) is not None)


SYNTHETIC_TASKS = {
    "synthetic_arithmetic": SyntheticArithmetic,
    "synthetic_spelling": SyntheticSpelling,
    "synthetic_mc": SyntheticMultipleChoice,
    "synthetic_chat": SyntheticChat,
}


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """n plain-text documents of 1-4 train-split examples each (a pretraining corpus supplement).
    Only train keys are used, so val/test problems never leak into pretraining."""
    rng = random.Random(f"synthetic_documents/{seed}")
    tasks = [cls(split="train", seed=seed) for cls in SYNTHETIC_TASKS.values()]
    docs = []
    for _ in range(n):
        task = rng.choice(tasks)
        examples = [task.get_example(rng.randrange(1 << 30)) for _ in range(rng.randint(1, 4))]
        docs.append("\n\n".join(conversation_to_text(conv) for conv in examples))
    return docs
