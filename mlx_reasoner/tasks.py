"""Built-in offline tasks: seeded generators of short problems with verifiable answers.

This module owns the task registry (``task:arithmetic``, ``task:letter-count``,
``task:parity``), the problem templates and their worked reasoning traces, and the held-out
rule. Example ``i`` of a task under a seed is a pure function of (task, seed, i), so a task is
reproducible and unlimited in size.
A question is held out when a stable hash of its text says so, whatever the seed or size, so
training and test questions never overlap. Questions are kept short and answers small (integers,
or "even"/"odd" for parity) so that a tiny model can learn them in minutes on a CPU.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

from .errors import ReasonerError
from .examples import TASK_PREFIX, Example, normalize_question, question_hash

HELDOUT_FRACTION = 0.1
# A walk gives up after this many draws in a row without a new question of the split.
_MAX_DRAWS_WITHOUT_NEW = 20_000


@dataclass(frozen=True)
class Task:
    """A named generator of examples.

    Attributes:
        name: The registry name, used as ``task:NAME``.
        description: One line for help text.
        generate: Draws one example from a seeded random generator.
        all_questions: Lists every question ``generate`` can produce, when there are few
            enough to list; ``None`` for tasks too large to list.
    """

    name: str
    description: str
    generate: Callable[[random.Random], Example]
    all_questions: Callable[[], Iterator[str]] | None = None

    def example(self, seed: int, index: int) -> Example:
        """Return example ``index`` under ``seed``, the same on every machine and run.

        Args:
            seed: The dataset seed.
            index: The example's position in the generated stream, from 0.

        Returns:
            The example.
        """
        # A string seed is hashed with SHA-512 by random.Random, not with the salted hash().
        return self.generate(random.Random(f"{self.name}:{seed}:{index}"))


def is_heldout(question: str) -> bool:
    """Return whether a question belongs to the held-out (test) split of every task.

    Args:
        question: The question text; case and spacing are ignored.

    Returns:
        True for about 10% of questions, always the same ones.
    """
    return question_hash(question) < HELDOUT_FRACTION


def task_examples(name: str, *, split: str = "train", count: int, seed: int = 0) -> list[Example]:
    """Generate ``count`` distinct examples of one split of a built-in task.

    Walks the task's stream ``i = 0, 1, 2, ...`` and keeps the examples whose question is in
    ``split`` and not seen before, so a smaller ``count`` gives a prefix of a larger one.

    Args:
        name: A task name from :data:`TASKS`, without the ``task:`` prefix.
        split: ``"train"`` or ``"test"`` (the held-out questions).
        count: How many examples to return, at least 1.
        seed: Picks a different stream of examples; the split of a question does not change.

    Returns:
        The examples, in stream order.

    Raises:
        ReasonerError: The task or split is unknown, ``count`` is below 1, or the task has
            fewer than ``count`` distinct questions in the split.
    """
    task = get_task(name)
    if split not in ("train", "test"):
        raise ReasonerError(f"task split must be 'train' or 'test', got '{split}'")
    if count < 1:
        raise ReasonerError(f"the number of task examples must be at least 1, got {count}")
    want_heldout = split == "test"
    if task.all_questions is not None:
        available = _count_questions(task.name, want_heldout)
        if count > available:
            raise ReasonerError(
                f"{TASK_PREFIX}{name} has only {available:,} distinct {split} questions, "
                f"but {count:,} were asked for; ask for at most {available:,}"
            )
    examples: list[Example] = []
    seen: set[str] = set()
    index = last_new = 0
    while len(examples) < count:
        if index - last_new > _MAX_DRAWS_WITHOUT_NEW:
            # Rare questions of a finite task can take too long to draw.
            raise ReasonerError(
                f"{TASK_PREFIX}{name} produced only {len(examples):,} distinct {split} questions "
                f"in {index:,} draws, but {count:,} were asked for; ask for at most "
                f"{len(examples):,}"
            )
        example = task.example(seed, index)
        index += 1
        key = normalize_question(example.question)
        if key in seen or is_heldout(example.question) != want_heldout:
            continue
        seen.add(key)
        examples.append(example)
        last_new = index
    return examples


def get_task(name: str) -> Task:
    """Look up a task by name.

    Args:
        name: A task name, without the ``task:`` prefix.

    Returns:
        The task.

    Raises:
        ReasonerError: No task has that name; the message lists the ones that exist.
    """
    if name not in TASKS:
        available = ", ".join(f"{TASK_PREFIX}{known}" for known in TASKS)
        raise ReasonerError(f"unknown task '{name}'; available tasks: {available}")
    return TASKS[name]


@cache
def _count_questions(name: str, heldout: bool) -> int:
    """How many distinct questions of a listable task fall in one split."""
    questions = TASKS[name].all_questions()
    return len({normalize_question(q) for q in questions if is_heldout(q) == heldout})


# --- arithmetic -------------------------------------------------------------------------------

# fmt: off
_PEOPLE = [
    ("Sam", "He"), ("Ana", "She"), ("Ben", "He"), ("Mia", "She"), ("Leo", "He"), ("Zoe", "She"),
    ("Tom", "He"), ("Eva", "She"), ("Max", "He"), ("Ivy", "She"), ("Raj", "He"), ("Lin", "She"),
]
_ITEMS = [
    "apples", "pears", "eggs", "coins", "cards", "books", "pens", "stickers", "marbles",
    "shells", "cookies", "stamps",
]
# fmt: on
_CONTAINERS = ["bags", "boxes", "jars", "packs"]
# {n} is the amount; the op is implied by the phrase.
_ADD_PHRASES = ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more"]
_SUBTRACT_PHRASES = ["gives away {n}", "loses {n}", "sells {n}", "gives {n} to a friend"]
_MAX_START = 20
_MAX_STEP = 9
_MAX_PER_CONTAINER = 9
_MAX_CONTAINERS = 5


def _arithmetic(rng: random.Random) -> Example:
    """A 2-3 step word problem over +, - and *, whose answer is a positive integer.

    >>> example = _arithmetic(random.Random(3))
    >>> example.reasoning.splitlines()[-1].endswith(" = " + example.answer)
    True
    """
    name, pronoun = rng.choice(_PEOPLE)
    items = rng.choice(_ITEMS)
    lines = []
    if rng.random() < 0.3:
        containers = rng.randint(2, _MAX_CONTAINERS)
        per_container = rng.randint(2, _MAX_PER_CONTAINER)
        total = containers * per_container
        box = rng.choice(_CONTAINERS)
        opening = rng.choice(
            [
                f"{name} has {containers} {box} of {per_container} {items}.",
                f"{name} has {containers} {box} with {per_container} {items} in each.",
            ]
        )
        lines.append(f"{containers} * {per_container} = {total}")
        num_steps = rng.randint(1, 2)
    else:
        total = rng.randint(2, _MAX_START)
        opening = f"{name} has {total} {items}."
        num_steps = rng.randint(2, 3)

    actions = []
    subtracted_last = False
    for _ in range(num_steps):
        # Leave at least one, so the count never goes negative (or to a dull 0).
        subtracted_last = total > 1 and rng.random() < 0.5
        if subtracted_last:
            amount = rng.randint(1, min(_MAX_STEP, total - 1))
            actions.append(rng.choice(_SUBTRACT_PHRASES).format(n=amount))
            lines.append(f"{total} - {amount} = {total - amount}")
            total -= amount
        else:
            amount = rng.randint(1, _MAX_STEP)
            actions.append(rng.choice(_ADD_PHRASES).format(n=amount))
            lines.append(f"{total} + {amount} = {total + amount}")
            total += amount

    if len(actions) == 1:
        story = f"{pronoun} {actions[0]}."
    elif len(actions) == 2:
        story = f"{pronoun} {actions[0]} and then {actions[1]}."
    else:
        story = f"{pronoun} {actions[0]}, {actions[1]}, and then {actions[2]}."
    ending = rng.choice(["now", "in the end", "left" if subtracted_last else "now"])
    question = f"{opening} {story} How many {items} does {name} have {ending}?"
    return Example(question=question, answer=str(total), reasoning="\n".join(lines))


# --- letter counting ----------------------------------------------------------------------------

# fmt: off
WORDS = [
    "strawberry", "banana", "mississippi", "cheese", "apple", "letter", "balloon", "committee",
    "bookkeeper", "raspberry", "address", "coffee", "parallel", "success", "pepper", "tomorrow",
    "butterfly", "programming", "reasoning", "answer", "question", "elephant", "occurrence",
    "bubble", "cherry", "bottle", "kitten", "puppy", "giraffe", "hippopotamus", "alligator",
    "cinnamon", "pineapple", "avocado", "broccoli", "potato", "tomato", "lemon", "orange",
    "grape", "melon", "peach", "carrot", "onion", "garlic", "pepperoni", "spaghetti", "pizza",
    "sandwich", "butter", "bread", "cookie", "muffin", "pancake", "waffle", "yellow", "purple",
    "green", "silver", "scarlet", "window", "door", "kitchen", "bedroom", "garden", "street",
    "village", "city", "country", "mountain", "river", "forest", "desert", "ocean", "island",
    "beach", "summer", "winter", "autumn", "spring", "morning", "evening", "afternoon",
    "midnight", "school", "teacher", "student", "library", "pencil", "paper", "scissors",
    "computer", "keyboard", "monitor", "internet", "telephone", "television", "camera",
    "picture", "music", "guitar", "piano", "violin", "trumpet", "drummer", "football",
    "baseball", "tennis", "soccer", "basketball", "swimming", "running", "jumping", "dancing",
    "singing", "reading", "writing", "thinking", "sleeping", "happiness", "kindness",
    "goodness", "business", "necessary", "different", "beautiful", "wonderful", "terrible",
    "possible", "probably", "really", "little", "middle", "people", "family", "mother",
    "father", "sister", "brother", "grandmother", "baby", "friend", "neighbor", "doctor",
    "engineer", "banner", "dinner", "summit", "rabbit", "parrot", "hammer",
    "ladder", "mirror", "pillow", "blanket", "umbrella", "sunglasses", "balloons", "puzzle",
    "jazz", "pizzazz", "fizz", "buzz", "zebra", "zipper", "quick", "quiet", "queen", "squirrel",
    "excellent", "exercise", "example", "express", "oxygen", "taxi", "yoyo", "mammal",
    "llama", "vanilla", "gorilla", "armadillo", "coconut", "tattoo", "assassin", "possess",
    "embarrass", "accommodate", "millennium", "bookshelf", "cupboard", "chocolate", "caramel",
    "marshmallow", "lollipop", "popcorn", "peppermint", "noodle", "rice", "sugar", "salt",
    "water", "coffeepot", "teapot", "kettle", "spoon", "fork", "knife", "plate", "bowl",
    "cup", "table", "chair", "sofa", "carpet", "ceiling", "floor", "roof", "chimney", "house",
    "apartment", "hospital", "airport", "station", "bicycle", "motorcycle", "airplane",
    "helicopter", "submarine", "rocket", "planet", "galaxy", "universe", "moon", "sun",
    "star", "comet", "asteroid", "satellite", "weather", "thunder", "lightning", "rainbow",
    "tornado", "hurricane", "volcano", "earthquake", "level", "radar", "racecar",
    "noon", "refer", "rotor", "civic", "kayak", "madam", "deed", "peep", "book", "mood", "tree",
    "free", "sheep", "seventeen", "eleven", "hundred", "thousand", "million",
]
# fmt: on

# {letter} is lower case, {upper} upper case, {word} the word.
_LETTER_TEMPLATES = [
    "How many times does the letter {letter} appear in '{word}'?",
    "How many {upper}'s are in {word}?",
    "Count the letter {letter} in '{word}'.",
    "How many {letter}'s are in the word '{word}'?",
    "In the word '{word}', how many times does '{letter}' occur?",
]
# Shares of letters the word lacks (answer 0) and of letters it repeats (answer 2 or more);
# the rest are drawn uniformly from its letters, mostly giving 1.
_ABSENT = 0.15
_REPEATED = 0.45


def letter_count_example(word: str, letter: str, template: int = 0) -> Example:
    """Build the letter-counting problem for one word, letter and phrasing.

    Counting ignores case. The reasoning spells the word and numbers each match.

    Args:
        word: The word to count in.
        letter: A single letter.
        template: Which phrasing to use, an index into the task's templates.

    Returns:
        The example, with the count as its answer.

    >>> example = letter_count_example("strawberry", "r")
    >>> example.question, example.answer
    ("How many times does the letter r appear in 'strawberry'?", '3')
    >>> print(example.reasoning)
    s t r(1) a w b e r(2) r(3) y
    Total: 3
    """
    letter = letter.lower()
    spelled, count = [], 0
    for char in word:
        if char.lower() == letter:
            count += 1
            spelled.append(f"{char}({count})")
        else:
            spelled.append(char)
    question = _LETTER_TEMPLATES[template].format(letter=letter, upper=letter.upper(), word=word)
    reasoning = f"{' '.join(spelled)}\nTotal: {count}"
    return Example(question=question, answer=str(count), reasoning=reasoning)


def _letter_count(rng: random.Random) -> Example:
    """A letter-counting problem over :data:`WORDS`, mostly letters the word contains."""
    word = rng.choice(WORDS)
    letters = sorted(set(word))
    repeated = [c for c in letters if word.count(c) > 1]
    roll = rng.random()
    if roll < _ABSENT:
        letter = rng.choice([c for c in string.ascii_lowercase if c not in word])
    elif roll < _ABSENT + _REPEATED and repeated:
        letter = rng.choice(repeated)
    else:
        letter = rng.choice(letters)
    return letter_count_example(word, letter, rng.randrange(len(_LETTER_TEMPLATES)))


def _letter_count_questions() -> Iterator[str]:
    """Every question the letter-count task can ask."""
    for word in WORDS:
        for letter in string.ascii_lowercase:
            for template in range(len(_LETTER_TEMPLATES)):
                yield letter_count_example(word, letter, template).question


# --- parity -------------------------------------------------------------------------------------

# The offline demo's task: is the number of z's among 16 random letters even or odd? A model
# this small cannot see that at a glance (it stays at a coin toss), but it can work it out
# letter by letter: the parity so far, one bit per letter, flips at every z. Its warm start
# shows both styles, so GRPO has a better one to select.
PARITY_LENGTH = 16
PARITY_MAX_Z = 9
_PARITY_OTHERS = "xqkv"
# Share of traces that work the parity out; the rest answer at a glance.
PARITY_WORKED_SHARE = 0.4
PARITY_GLANCE = "At a glance."


def parity_example(letters: str, worked: bool) -> Example:
    """The parity problem for one string, with a worked or an at-a-glance trace.

    >>> example = parity_example("xzzqkzvx", worked=True)
    >>> example.question, example.reasoning, example.answer
    ('Even or odd number of z: xzzqkzvx', '001000111', 'odd')
    >>> parity_example("xzzqkzvx", worked=False).reasoning
    'At a glance.'
    """
    # The worked trace is the parity so far: 0 (even) before the first letter, then one bit
    # after each letter. The leading 0 lets the choice of style come before the first letter's
    # bit, so choosing to work it out cannot get that bit wrong.
    odd = 0
    bits = [str(odd)]
    for char in letters:
        odd ^= char == "z"
        bits.append(str(odd))
    reasoning = "".join(bits) if worked else PARITY_GLANCE
    return Example(
        question=f"Even or odd number of z: {letters}",
        answer="odd" if odd else "even",
        reasoning=reasoning,
    )


def _parity(rng: random.Random) -> Example:
    """Sixteen letters over x, q, k, v and z, with 0-9 z's (uniform) at random places."""
    count = rng.randrange(PARITY_MAX_Z + 1)
    places = set(rng.sample(range(PARITY_LENGTH), count))
    letters = "".join(
        "z" if i in places else rng.choice(_PARITY_OTHERS) for i in range(PARITY_LENGTH)
    )
    return parity_example(letters, worked=rng.random() < PARITY_WORKED_SHARE)


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            "arithmetic",
            "2-3 step word problems with +, - and * on small numbers",
            _arithmetic,
        ),
        Task(
            "letter-count",
            "how many times a letter appears in a common English word",
            _letter_count,
            _letter_count_questions,
        ),
        Task(
            "parity",
            "whether 16 random letters hold an even or odd number of z's (the demo's task)",
            _parity,
        ),
    ]
}
