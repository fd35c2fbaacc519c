"""Prompt sets for circuit tracing: indirect-object identification (IOI), gendered pronouns (GP)
and greater-than (GT), each prompt with its answer tokens and the positions of its roles.

    IOI  "Then, Mary and John went to the store. John gave a drink to"  → " Mary" (IO) vs " John" (S)
         roles: IO, S1 (first subject), S2 (second subject), END (last token)
    GP   "So Mary is a really great friend, isn't"  → " she" vs " he";  roles: NAME, END
    GT   "The war lasted from the year 1732 to the year 17"  → a two-digit year token above 32;
         roles: YY, END. It needs a tokenizer with whole two-digit tokens after the century (GPT-2);
         with digit-level tokens (SmolLM2, Llama) `greater_than` is a clear error and
         `greater_than_digits` asks for the tens digit instead (correct: a digit ≥ the start's).

The metric of a prompt is the logit difference at END: logit(correct) − logit(wrong) (GT: the mean
logit of the correct answers minus the mean of the wrong ones). Words that are not one token in the
subject's tokenizer are dropped; a task left without prompts is an error naming the words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import CircuitError

IOI_TEMPLATES = [
    "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a lot of fun at the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} were working at the {PLACE}. {B} decided to give a {OBJECT} to",
    "Then, {B} and {A} were thinking about going to the {PLACE}. {B} wanted to give a {OBJECT} to",
    "Then, {B} and {A} had a long argument, and afterwards {B} said to",
    "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give it to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give the {OBJECT} to",
    "While {B} and {A} were working at the {PLACE}, {B} gave a {OBJECT} to",
    "While {B} and {A} were commuting to the {PLACE}, {B} gave a {OBJECT} to",
    "After the lunch, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Afterwards, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a long argument. Afterwards {B} said to",
    "The {PLACE} {B} and {A} went to had a {OBJECT}. {B} gave it to",
    "Friends {B} and {A} found a {OBJECT} at the {PLACE}. {B} gave it to",
]
NAMES = [
    "Mary", "John", "Tom", "James", "Alice", "Bob", "Sarah", "Michael", "David", "Anna", "Paul", "Laura",
    "Daniel", "Emma", "Peter", "Kate", "George", "Lisa", "Mark", "Susan", "Jack", "Helen", "Frank", "Rachel",
]  # fmt: skip
PLACES = [
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "station",
    "house",
    "park",
    "market",
]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "ball", "book"]
GP_TEMPLATES = [
    "So {name} is a really great friend, isn't",
    "So {name} is such a good cook, isn't",
    "So {name} is a very kind person, isn't",
    "So {name} is a really nice person, isn't",
    "So {name} is such a funny person, isn't",
]
GP_NAMES = {
    "she": ["Mary", "Alice", "Sarah", "Anna", "Laura", "Emma", "Kate", "Lisa", "Susan", "Helen"],
    "he": ["John", "Tom", "James", "Bob", "Michael", "David", "Paul", "Daniel", "Peter", "George"],
}
GT_NOUNS = ["war", "trip", "reign", "project", "drought", "strike", "voyage", "siege", "famine", "journey"]
GT_TEMPLATE = "The {noun} lasted from the year {XX}{YY} to the year {XX}"


@dataclass
class TaskPrompt:
    """One prompt: its text, the correct and wrong answer token ids, and role → token position (in
    the tokenised prompt with BOS first)."""

    text: str
    correct: list[int]
    wrong: list[int]
    roles: dict[str, int] = field(default_factory=dict)


def _one_token(tok, word: str) -> int | None:
    ids = tok(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _ids(tok, text: str, bos: int | None) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids if bos is None else [bos, *ids]


def _bos(tok) -> int | None:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _single(tok, words: list[str], what: str) -> list[str]:
    kept = [w for w in words if _one_token(tok, " " + w) is not None]
    if not kept:
        raise CircuitError(
            f"none of the {what} {words[:6]}… is one token in this tokenizer (with a leading space)"
        )
    return kept


def _position(ids: list[int], token: int, nth: int = 0) -> int:
    hits = [i for i, t in enumerate(ids) if t == token]
    if len(hits) <= nth:
        raise CircuitError(
            f"token {token} occurs {len(hits)} times in the prompt; needed occurrence {nth + 1}"
        )
    return hits[nth]


def ioi(tok, n: int, seed: int = 0) -> list[TaskPrompt]:
    """n IOI prompts (BABA templates, half of them swapped to ABBA)."""
    rng = random.Random(seed)
    names = _single(tok, NAMES, "names")
    places, objects = _single(tok, PLACES, "places"), _single(tok, OBJECTS, "objects")
    bos, out = _bos(tok), []
    for i in range(n):
        a, b = rng.sample(names, 2)
        t = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        text = t.format(A=a, B=b, PLACE=rng.choice(places), OBJECT=rng.choice(objects))
        if i % 2:  # ABBA: the indirect object is named first
            text = text.replace(f"{b} and {a}", f"{a} and {b}", 1)
        ids = _ids(tok, text, bos)
        io, s = _one_token(tok, " " + a), _one_token(tok, " " + b)
        assert io is not None and s is not None
        roles = {
            "IO": _position(ids, io),
            "S1": _position(ids, s),
            "S2": _position(ids, s, 1),
            "END": len(ids) - 1,
        }
        out.append(TaskPrompt(text, [io], [s], roles))
    return out


def gendered_pronoun(tok, n: int = 100, seed: int = 0) -> list[TaskPrompt]:
    """Up to 5 templates × 20 names (n = 100 by default)."""
    she, he = _one_token(tok, " she"), _one_token(tok, " he")
    if she is None or he is None:
        raise CircuitError("' she' and ' he' must each be one token for the gendered-pronoun task")
    bos, out = _bos(tok), []
    pairs = [(t, name, g) for t in GP_TEMPLATES for g in ("she", "he") for name in GP_NAMES[g]]
    random.Random(seed).shuffle(pairs)
    for t, name, g in pairs[:n]:
        text = t.format(name=name)
        ids = _ids(tok, text, bos)
        correct, wrong = (she, he) if g == "she" else (he, she)
        first = tok(" " + name, add_special_tokens=False)["input_ids"][0]
        out.append(TaskPrompt(text, [correct], [wrong], {"NAME": _position(ids, first), "END": len(ids) - 1}))
    return out


def _two_digit_tokens(tok) -> dict[int, int] | None:
    """Two-digit strings "00".."99" -> their one token id, or None if any is not one token."""
    ids = {}
    for y in range(100):
        i = _one_token(tok, f"{y:02d}")
        if i is None:
            return None
        ids[y] = i
    return ids


def greater_than(tok, n: int, seed: int = 0) -> list[TaskPrompt]:
    """GT prompts for tokenizers where " 1732" is [" 17", "32"]."""
    digits = _two_digit_tokens(tok)
    if digits is None or (_ids(tok, " 1732", None) != [_one_token(tok, " 17"), digits[32]]):
        raise CircuitError(
            "this tokenizer has no valid years for greater-than (it splits ' 1732' into "
            f"{len(_ids(tok, ' 1732', None))} tokens, not [' 17', '32']): use greater_than_digits"
        )
    rng = random.Random(seed)
    bos, out = _bos(tok), []
    for _ in range(n):
        xx, yy = rng.randint(11, 18), rng.randint(2, 98)
        text = GT_TEMPLATE.format(noun=rng.choice(GT_NOUNS), XX=xx, YY=f"{yy:02d}")
        ids = _ids(tok, text, bos)
        correct = [digits[y] for y in range(yy + 1, 100)]
        wrong = [digits[y] for y in range(0, yy + 1)]
        out.append(TaskPrompt(text, correct, wrong, {"YY": _position(ids, digits[yy]), "END": len(ids) - 1}))
    return out


def greater_than_digits(tok, n: int, seed: int = 0) -> list[TaskPrompt]:
    """The digit-level variant: "… from the year 1732 to the year 17" → the next token is the tens
    digit; correct: digits above the start's tens digit (3 → 4..9), wrong: those below (0..2). The
    equal digit is neither (it would need the units digit)."""
    d = [_one_token(tok, str(i)) for i in range(10)]
    if any(i is None for i in d):
        raise CircuitError("the digits 0-9 are not single tokens in this tokenizer")
    rng = random.Random(seed)
    bos, out = _bos(tok), []
    for _ in range(n):
        xx, tens, units = rng.randint(11, 18), rng.randint(1, 8), rng.randint(0, 9)
        text = GT_TEMPLATE.format(noun=rng.choice(GT_NOUNS), XX=xx, YY=f"{tens}{units}")
        ids = _ids(tok, text, bos)
        correct = [d[i] for i in range(tens + 1, 10)]
        wrong = [d[i] for i in range(0, tens)]
        prefix = text[: text.index(f"{xx}{tens}{units}") + 3]  # up to the start year's tens digit
        pos = len(_ids(tok, prefix, bos)) - 1
        out.append(TaskPrompt(text, correct, wrong, {"YY": pos, "END": len(ids) - 1}))  # type: ignore[arg-type]
    return out


def custom(tok, text: str, correct: str, wrong: str, roles: dict[str, str] | None = None) -> TaskPrompt:
    """A prompt of your own: the answers (e.g. " Paris", " London") must each be one token, and
    each role names a word of the prompt (its first token's position is used)."""
    ids = _ids(tok, text, _bos(tok))
    answers = []
    for what, word in (("correct", correct), ("wrong", wrong)):
        i = _one_token(tok, word)
        if i is None:
            n = len(tok(word, add_special_tokens=False)["input_ids"])
            raise CircuitError(f"the {what} answer {word!r} is {n} tokens, not one: pick a one-token word")
        answers.append(i)
    pos = {"END": len(ids) - 1}
    for role, word in (roles or {}).items():
        if word not in text:
            raise CircuitError(f"role {role}: {word!r} does not occur in the prompt")
        pos[role] = len(_ids(tok, text[: text.index(word) + len(word)], _bos(tok))) - 1
    return TaskPrompt(text, [answers[0]], [answers[1]], pos)


TASKS = {"ioi": ioi, "gp": gendered_pronoun, "gt": greater_than, "gt-digits": greater_than_digits}


def prompts(task: str, tok, n: int, seed: int = 0) -> list[TaskPrompt]:
    if task not in TASKS:
        raise CircuitError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return TASKS[task](tok, n, seed)
