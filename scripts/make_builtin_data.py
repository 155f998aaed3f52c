"""Generate the built-in preference dataset (dpo_ds/builtin/{train,test}.jsonl), deterministically.

Each pair differs in one systematic, easily detected way, so that a 135M model learns it in a
few dozen DPO steps on a CPU:
  - correctness: a right answer vs a wrong one (arithmetic, comparisons, simple facts);
  - format: following an instruction ("answer in one word", "answer in uppercase",
    "end with 'Done.'") vs ignoring it, with the same correct content.
Rows are mixed: standard (prompt/chosen/rejected strings) and conversational (message lists,
sometimes with a system message or an earlier exchange). Train and test share no question.

    python scripts/make_builtin_data.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 20240601
N_TRAIN, N_TEST = 1200, 200
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "dpo_ds" / "builtin"


@dataclass(frozen=True)
class Fact:
    """A question with its one-word answer and full-sentence answers, right and wrong."""

    question: str
    word: str
    sentence: str
    wrong_sentence: str


CAPITALS = [
    ("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan"),
    ("Germany", "Berlin", "Munich"), ("Spain", "Madrid", "Barcelona"), ("Russia", "Moscow", "Kazan"),
    ("Egypt", "Cairo", "Alexandria"), ("China", "Beijing", "Shanghai"), ("Canada", "Ottawa", "Toronto"),
    ("Australia", "Canberra", "Sydney"), ("Brazil", "Brasilia", "Rio"), ("India", "Delhi", "Mumbai"),
    ("Turkey", "Ankara", "Istanbul"), ("Greece", "Athens", "Sparta"), ("Portugal", "Lisbon", "Porto"),
    ("Ireland", "Dublin", "Cork"), ("Norway", "Oslo", "Bergen"), ("Sweden", "Stockholm", "Malmo"),
    ("Poland", "Warsaw", "Krakow"), ("Austria", "Vienna", "Salzburg"), ("Kenya", "Nairobi", "Mombasa"),
    ("Peru", "Lima", "Cusco"), ("Cuba", "Havana", "Santiago"), ("Finland", "Helsinki", "Turku"),
    ("Denmark", "Copenhagen", "Aarhus"), ("Hungary", "Budapest", "Debrecen"), ("Belgium", "Brussels", "Antwerp"),
    ("Qatar", "Doha", "Khor"), ("Ukraine", "Kyiv", "Lviv"),
    ("Thailand", "Bangkok", "Phuket"), ("Vietnam", "Hanoi", "Saigon"), ("Chile", "Santiago", "Valparaiso"),
    ("Morocco", "Rabat", "Casablanca"), ("Nigeria", "Abuja", "Lagos"), ("Scotland", "Edinburgh", "Glasgow"),
    ("Switzerland", "Bern", "Zurich"), ("Netherlands", "Amsterdam", "Rotterdam"), ("Iceland", "Reykjavik", "Akureyri"),
]
COLORS = [
    ("the sky on a clear day", "blue", "green"), ("grass", "green", "purple"), ("snow", "white", "black"),
    ("a ripe banana", "yellow", "blue"), ("coal", "black", "white"), ("a ripe strawberry", "red", "blue"),
    ("a carrot", "orange", "purple"), ("milk", "white", "green"), ("a lemon", "yellow", "black"),
    ("a fire truck", "red", "green"), ("a polar bear", "white", "pink"), ("a crow", "black", "yellow"),
    ("the sun", "yellow", "green"), ("an emerald", "green", "red"), ("a tomato", "red", "blue"),
]
OPPOSITES = [
    ("hot", "cold", "warm"), ("big", "small", "large"), ("up", "down", "over"), ("fast", "slow", "quick"),
    ("happy", "sad", "glad"), ("light", "dark", "bright"), ("old", "young", "ancient"), ("open", "closed", "wide"),
    ("early", "late", "soon"), ("full", "empty", "whole"), ("hard", "soft", "tough"), ("wet", "dry", "damp"),
    ("rich", "poor", "wealthy"), ("strong", "weak", "tough"), ("tall", "short", "high"), ("day", "night", "noon"),
    ("win", "lose", "gain"), ("buy", "sell", "get"), ("push", "pull", "press"), ("loud", "quiet", "noisy"),
    ("thick", "thin", "dense"), ("clean", "dirty", "neat"), ("cheap", "expensive", "free"), ("north", "south", "east"),
    ("left", "right", "center"), ("first", "last", "next"), ("love", "hate", "like"), ("true", "false", "real"),
]
PLURALS = [
    ("mouse", "mice", "mouses"), ("child", "children", "childs"), ("foot", "feet", "foots"),
    ("tooth", "teeth", "tooths"), ("man", "men", "mans"), ("woman", "women", "womans"), ("goose", "geese", "gooses"),
    ("person", "people", "persons"), ("leaf", "leaves", "leafs"), ("knife", "knives", "knifes"),
    ("wolf", "wolves", "wolfs"), ("box", "boxes", "boxs"), ("city", "cities", "citys"), ("baby", "babies", "babys"),
]
LEGS = [
    ("a spider", 8, 6), ("a dog", 4, 2), ("a bird", 2, 4), ("an ant", 6, 8), ("a cat", 4, 3), ("a horse", 4, 6),
    ("a chicken", 2, 4), ("a bee", 6, 4), ("a cow", 4, 2), ("a duck", 2, 3), ("an octopus", 8, 10),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def fact_pool() -> list[Fact]:
    """Every fact question with one-word answers (format tasks use these too)."""
    legs = [(a, NUMBER_WORDS[n], NUMBER_WORDS[w]) for a, n, w in LEGS]
    facts = _facts(CAPITALS, "What is the capital of {x}?", "The capital of {x} is {a}.", word=str)
    facts += _facts(COLORS, "What color is {x}?", "{X} is {a}.")
    facts += _facts(OPPOSITES, "What is the opposite of '{x}'?", "The opposite of '{x}' is '{a}'.")
    facts += _facts(PLURALS, "What is the plural of '{x}'?", "The plural of '{x}' is '{a}'.")
    facts += _facts(legs, "How many legs does {x} have?", "{X} has {a} legs.")
    for names, unit in ((DAYS, "day"), (MONTHS, "month")):
        after = [(name, names[(i + 1) % len(names)], names[(i + 3) % len(names)]) for i, name in enumerate(names)]
        facts += _facts(after, f"Which {unit} comes after {{x}}?", f"The {unit} after {{x}} is {{a}}.", word=str)
    return facts


def _facts(rows, question: str, sentence: str, word=str.capitalize) -> list[Fact]:
    """One Fact per (subject x, answer, wrong answer) row; {X} is x with a capital first letter."""
    def say(x: str, a: str) -> str:
        return sentence.format(x=x, X=x[0].upper() + x[1:], a=a)

    return [Fact(question.format(x=x), word(a), say(x, a), say(x, wrong)) for x, a, wrong in rows]


def arithmetic(rng: random.Random) -> Fact:
    """A small sum, difference or product; the wrong answer is off by a small amount."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        result = a * b
    else:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b
    wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
    if wrong < 0:
        wrong = result + 1
    expr = f"{a} {op} {b}"
    return Fact(f"What is {expr}?", str(result), f"{expr} equals {result}.", f"{expr} equals {wrong}.")


def comparison(rng: random.Random) -> Fact:
    a, b = rng.sample(range(2, 100), 2)
    big, small = max(a, b), min(a, b)
    return Fact(f"Which number is larger, {a} or {b}?", str(big), f"{big} is larger than {small}.",
                f"{small} is larger than {big}.")


ONE_WORD = ["Answer in one word.", "Reply with a single word.", "Use only one word."]
UPPER = ["Answer in uppercase.", "Reply in capital letters only.", "Write your answer in all caps."]
DONE = ["End your answer with 'Done.'", "Finish your reply with the word 'Done.'"]
SYSTEM_ONE_WORD = "You always answer with exactly one word."
SYSTEM_UPPER = "You always write in uppercase letters."
SYSTEM_DONE = "You always end every answer with 'Done.'"


def make_pair(task: str, fact: Fact, rng: random.Random) -> tuple[str, str, str, str | None]:
    """(instruction-bearing question, chosen, rejected, system message or None)."""
    if task == "correct":
        return fact.question, fact.sentence, fact.wrong_sentence, None
    instruction, system, chosen = {
        "one_word": (ONE_WORD, SYSTEM_ONE_WORD, f"{fact.word}."),
        "upper": (UPPER, SYSTEM_UPPER, fact.sentence.upper()),
        "done": (DONE, SYSTEM_DONE, f"{fact.sentence} Done."),
    }[task]
    if rng.random() < 0.25:
        return fact.question, chosen, fact.sentence, system
    return f"{fact.question} {rng.choice(instruction)}", chosen, fact.sentence, None


def to_row(question: str, chosen: str, rejected: str, system: str | None, history: tuple[str, str] | None,
           conversational: bool) -> dict:
    if not conversational:
        lines = [system] if system else []
        if history:
            lines.append(f"Question: {history[0]}\nAnswer: {history[1]}")
        lines.append(f"Question: {question}\nAnswer:")
        return {"prompt": "\n".join(lines), "chosen": f" {chosen}", "rejected": f" {rejected}"}
    messages = [{"role": "system", "content": system}] if system else []
    if history:
        messages += [{"role": "user", "content": history[0]}, {"role": "assistant", "content": history[1]}]
    messages.append({"role": "user", "content": question})
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """All rows, shuffled and split into (train, test) with disjoint prompts."""
    rng = random.Random(seed)
    facts = fact_pool()
    rows: dict[str, dict] = {}
    tasks = ["correct", "correct", "one_word", "upper", "done"]
    attempts = 0
    while len(rows) < N_TRAIN + N_TEST:
        attempts += 1
        if attempts > 100 * (N_TRAIN + N_TEST):
            raise RuntimeError("cannot draw enough distinct prompts; enlarge the pools")
        task = rng.choice(tasks)
        kind = rng.random()
        fact = rng.choice(facts) if kind < 0.5 else arithmetic(rng) if kind < 0.8 else comparison(rng)
        question, chosen, rejected, system = make_pair(task, fact, rng)
        if chosen == rejected:
            raise AssertionError(f"task {task} leaves {fact} unchanged")
        conversational = rng.random() < 0.5
        history = None
        if system is None and rng.random() < 0.2:
            earlier = rng.choice(facts)
            history = (earlier.question, earlier.sentence)
        # One row per question: the same question never appears in both splits, in any format.
        key = question
        if key not in rows:
            rows[key] = to_row(question, chosen, rejected, system, history, conversational)
    ordered = list(rows.values())
    rng.shuffle(ordered)
    return ordered[:N_TRAIN], ordered[N_TRAIN:]


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    train, test = generate()
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} test rows to {out}")


if __name__ == "__main__":
    main()
