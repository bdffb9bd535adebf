"""A small instruction data set that llmzoo makes itself (no download), for the fine-tuning demo and the tests.

Three tasks on short lists of common words, each answer a short exact string, so that exact-match accuracy on
held-out records measures whether fine-tuning worked: the first word of a list, its last word, a word repeated
twice. The training file holds ``messages`` records, a
seeded share of them two-turn conversations with a system prompt; the test file ``prompt`` / ``response`` pairs.

    python -m llmzoo.data.instructions runs/instructions        # train.jsonl (2000) and test.jsonl (200)
    python -m llmzoo.data.instructions runs/preferences --pairs # pairs.jsonl (2000 preference pairs)

The preference pairs (for DPO) answer the same tasks: the chosen answer is the right one and ends with :data:`MARK`
(``"king!"``), the rejected one is another word, without it (``"land"``): ending with the mark is a property a greedy
reply has or lacks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from llmzoo.files import write_atomic

WORDS = ("king love man lord good night heart death eyes life day hand time blood world sweet fair true heaven "
         "name father mother son friend house fire water land head face word soul grace honour peace war sun "
         "moon gold hope fear youth").split()
SYSTEM = "You answer with the answer only."


def _words(rng: np.random.Generator, low: int = 2, high: int = 6) -> list[str]:
    return [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(low, high + 1)), replace=False)]


def make_task(rng: np.random.Generator) -> tuple[str, str]:
    """One ``(prompt, answer)`` of a random task."""
    task = int(rng.integers(3))
    if task == 2:
        word = WORDS[int(rng.integers(len(WORDS)))]
        return f"Repeat twice: {word}", f"{word} {word}"
    words = _words(rng)
    return (f"What is the first word of: {' '.join(words)}", words[0]) if task == 0 else \
        (f"What is the last word of: {' '.join(words)}", words[-1])


def make_records(count: int, seed: int = 0, conversations: float = 0.25, messages: bool = True) -> list[dict]:
    """``count`` records: ``messages`` records (a ``conversations`` share of them two-turn, with a system prompt), or
    ``prompt`` / ``response`` pairs when not ``messages``."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        if not messages:
            prompt, answer = make_task(rng)
            records.append({"prompt": prompt, "response": answer})
            continue
        turns = [{"role": "system", "content": SYSTEM}] if rng.random() < conversations else []
        for _ in range(2 if turns else 1):
            prompt, answer = make_task(rng)
            turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        records.append({"messages": turns})
    return records


MARK = "!"  # what a chosen answer ends with


def make_pairs(count: int, seed: int = 0) -> list[dict]:
    """``count`` preference records ``{"prompt", "chosen", "rejected"}``: the chosen answer is right and ends with
    :data:`MARK`, the rejected one is a word that does not begin the right answer, without the mark."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        prompt, answer = make_task(rng)
        wrong = WORDS[int(rng.integers(len(WORDS)))]
        if wrong == answer.split()[0]:
            wrong = WORDS[(WORDS.index(wrong) + 1) % len(WORDS)]
        records.append({"prompt": prompt, "chosen": answer + MARK, "rejected": wrong})
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """``records`` as a ``.jsonl`` file, written whole or not at all."""
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records).encode())
    return Path(path)


def write_instructions(directory: str | Path, train: int = 2000, test: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """``train.jsonl`` (messages records) and ``test.jsonl`` (prompt / response records, another seed) in
    ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return (write_jsonl(make_records(train, seed), directory / "train.jsonl"),
            write_jsonl(make_records(test, seed + 1, messages=False), directory / "test.jsonl"))


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmzoo.data.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", action="store_true", help="write pairs.jsonl, --train preference pairs, instead")
    options = parser.parse_args(args)
    if options.pairs:
        Path(options.directory).mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_jsonl(make_pairs(options.train, options.seed), Path(options.directory) / 'pairs.jsonl')}")
        return
    for path in write_instructions(options.directory, options.train, options.test, options.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
