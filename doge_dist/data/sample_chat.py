"""A small synthetic chat and preference set, built offline and deterministically, for the demo and tests.

Why synthetic: real chat data (smoltalk, ultrafeedback) needs a download. These conversations are
made from templates with a seeded generator: arithmetic questions (exact answers, so a preference
pair has a clearly right and a clearly wrong completion) and questions about Python keywords whose
answers are the first sentence of the Python reference topic (``pydoc_data``, the prose the sample
corpus pretrains on). Same seed and Python version -> byte-identical files.
"""
from __future__ import annotations

import json
import os
import random
import re

from .errors import check_output_dir

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly and exactly.")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _topics() -> list[tuple[str, str]]:
    """(topic name, first sentence) for the Python reference topics with a usable first sentence."""
    from pydoc_data.topics import topics

    found = []
    for name in sorted(topics):
        text = re.sub(r"[*=\-]{3,}", " ", topics[name])  # drop reST heading underlines
        words = " ".join(text.split()[:80])
        match = re.search(r"[A-Z][^.]{20,200}\.", words)
        if match and name.isidentifier():
            found.append((name, match.group(0)))
    return found


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """(question, right answer, wrong answer)."""
    a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice(list(OPERATIONS))
    result = OPERATIONS[op](a, b)
    wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}.", f"{a} {op} {b} = {wrong}."


def _topic_question(rng: random.Random, topics: list[tuple[str, str]]) -> tuple[str, str, str]:
    (name, answer), (_, other) = rng.sample(topics, 2)
    while other == answer:  # a few topics share their first sentence
        other = rng.choice(topics)[1]
    return f"What does the Python reference say about '{name}'?", answer, other


def _question(rng: random.Random, topics: list[tuple[str, str]]) -> tuple[str, str, str]:
    return _arithmetic(rng) if rng.random() < 0.5 else _topic_question(rng, topics)


def conversation(rng: random.Random, topics: list[tuple[str, str]]) -> dict:
    """One SFT record: an optional system prompt, then one to three question/answer turns."""
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        question, answer, _ = _question(rng, topics)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def preference(rng: random.Random, topics: list[tuple[str, str]]) -> dict:
    """One DPO record (strings for the prompt and both completions, the simplest accepted form)."""
    question, right, wrong = _question(rng, topics)
    return {"prompt": question, "chosen": right, "rejected": wrong}


# what a validation record must not share with a training one: the whole conversation; a preference prompt
HELD_OUT_KEYS = {"sft": lambda record: json.dumps(record), "dpo": lambda record: record["prompt"]}


def build_sample_chat(out_dir: str | os.PathLike, sft: int = 2000, dpo: int = 1000, valid: int = 64, seed: int = 0) -> dict[str, int]:
    """Write sft_{train,valid}.jsonl and dpo_{train,valid}.jsonl under ``out_dir``; returns records per file.
    The validation sets are held out: draws that repeat a training record (``HELD_OUT_KEYS``) are skipped."""
    out = check_output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topics = _topics()
    counts = {}
    for kind, make, train_count in (("sft", conversation, sft), ("dpo", preference, dpo)):
        key = HELD_OUT_KEYS[kind]
        seen: set[str] = set()
        for split, count in (("train", train_count), ("valid", valid)):
            rng = random.Random(f"{seed}-{kind}-{split}")
            records = []
            while len(records) < count:
                record = make(rng, topics)
                if split == "train":
                    seen.add(key(record))
                elif key(record) in seen:
                    continue
                records.append(record)
            path = out / f"{kind}_{split}.jsonl"
            partial = path.with_name(path.name + ".partial")
            with open(partial, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            os.replace(partial, path)
            counts[path.name] = count
    return counts
