"""Arithmetic word problems for llmforge: a reward plugin and an environment.

Each record of the data is {"prompt": "...", "answer": "42", "a": 6, "b": 7, "op": "*"}: llmforge
hands plugins the whole record, so they can use any field.
"""

from __future__ import annotations

import random
import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in a reply: its final answer."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


class Answer:
    """Reward `arith-answer`: `correct` is 1 when the reply's last number is the record's answer;
    `concise` adds a little for replies of at most `max_words` words. llmforge logs both parts
    (reward/arith-answer/correct, .../concise) and rewards their sum."""

    parallel = False  # cheap: scored in the training process (True: in worker processes)

    def check(self, options: dict) -> None:
        """Called when the run is planned, before any training: reject options it does not know."""
        unknown = set(options) - {"max_words"}
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} (known: max_words)")
        if not isinstance(options.get("max_words", 30), int):
            raise ValueError("max_words must be a whole number")

    def score(self, reply) -> dict:
        got = last_number(reply.text)
        correct = got is not None and got == float(reply.record["answer"])
        short = len(reply.text.split()) <= reply.options.get("max_words", 30)
        return {"correct": float(correct), "concise": 0.1 * float(short and reply.ended)}


answer = Answer()


class Checker:
    """Environment `arith-checker`: one tool, `check_answer(answer)`, that says whether an answer is
    right. The conversation's reward: 1 for a right final answer, less 0.2 for each check used."""

    tools = [{"type": "function", "function": {
        "name": "check_answer", "description": "Say whether a number is the answer to the problem",
        "parameters": {"type": "object", "properties": {"answer": {"type": "number"}}, "required": ["answer"]}}}]

    def check(self, options: dict) -> None:
        if set(options) - {"cost"}:
            raise ValueError("the only option is cost (what one check costs, default 0.2)")

    def call(self, name: str, arguments: dict, episode) -> str:
        episode.state["checks"] = episode.state.get("checks", 0) + 1  # per conversation
        return "correct" if float(arguments["answer"]) == float(episode.record["answer"]) else "not correct"

    def reward(self, episode) -> dict:
        final = episode.messages[-1]
        got = last_number(final["content"]) if final["role"] == "assistant" else None
        cost = episode.options.get("cost", 0.2)
        return {"correct": float(got == float(episode.record["answer"])),
                "checks": -cost * episode.state.get("checks", 0)}


checker = Checker()


def problems(n: int, seed: int = 0) -> list[dict]:
    """n word problems with their answers (python -c 'import arith_tasks, json; ...' writes a file)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        a, b, op = rng.randint(2, 40), rng.randint(2, 20), rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        what = {"+": f"Mia has {a} apples and buys {b} more. How many apples does she have?",
                "-": f"Mia has {a} apples and gives {b} away. How many apples does she have left?",
                "*": f"Mia buys {a} bags of {b} apples. How many apples does she have?"}[op]
        out.append({"prompt": what, "answer": str(value), "a": a, "b": b, "op": op})
    return out
