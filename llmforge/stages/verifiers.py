"""The built-in verifiers a grpo stage rewards replies with, chosen by name (a recipe never names
code); reward models (stages/reward.py: RewardScorer) and plugins of installed packages
(stages/plugins.py) are the other kinds of reward.

Every verifier scores one reply from its text, the prompt's reference answer, whether the turn
ended (the model closed it, rather than running out of max_new_tokens) and its length in tokens.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Verifier:
    name: str
    # (reply, answer, ended, n_tokens, max_new_tokens, within) -> reward
    score: Callable[[str, str | None, bool, int, int, int], float]
    needs_answer: bool = False  # it checks the reply against the prompt's reference answer (0 without one)
    needs: tuple[str, str] | None = None  # (module, llmforge extra) it imports, when that is optional


def _math(reply: str, answer: str, *_) -> float:
    """1 if the reply's final answer (its last \\boxed{}, else its last number or expression) equals
    the reference symbolically: 1/2, 0.5 and \\frac{1}{2} are one answer (math-verify, Hugging
    Face's checker for the Open R1 and lighteval math evals)."""
    from math_verify import parse, verify as equal  # the optional extra llmforge[math]

    # A reference answer is LaTeX or plain math; math-verify reads LaTeX between $ signs (a bare \\sqrt{4}
    # is no expression to it).
    gold = (parse(f"${answer}$") if "$" not in answer and "\\boxed" not in answer else []) or parse(answer)
    got = parse(reply)
    return float(bool(gold) and bool(got) and equal(gold, got))


def _normal(text: str) -> str:
    return " ".join(text.split())


# exact: 1 if the reply is the answer (whitespace runs count as one space); contains: 1 if the answer
# is in it; regex: 1 if the answer, a Python regular expression, matches somewhere in it; format: 1
# if the turn ended; length: 0 up to `within` tokens, then falling linearly to -1 at max_new_tokens
# (DAPO's soft overlong punishment, Yu et al. 2025); math: 1 if the reply's final answer equals the
# reference symbolically (_math).
VERIFIERS: dict[str, Verifier] = {v.name: v for v in (
    Verifier("exact", lambda reply, answer, *_: float(_normal(reply) == _normal(answer)), needs_answer=True),
    Verifier("contains", lambda reply, answer, *_: float(_normal(answer) in _normal(reply)), needs_answer=True),
    Verifier("regex", lambda reply, answer, *_: float(re.search(answer, reply) is not None), needs_answer=True),
    Verifier("format", lambda reply, answer, ended, *_: float(ended)),
    Verifier("length", lambda reply, answer, ended, n, most, within: -max(0, n - within) / max(1, most - within)),
    Verifier("math", _math, needs_answer=True, needs=("math_verify", "math")),
)}
NEEDS_ANSWER = tuple(name for name, v in VERIFIERS.items() if v.needs_answer)


def verify(name: str, reply: str, answer: str | None, ended: bool, n_tokens: int, *, max_new_tokens: int,
           within: int) -> float:
    """The reward verifier `name` gives one reply."""
    v = VERIFIERS[name]
    if v.needs_answer and answer is None:
        return 0.0
    return v.score(reply, answer, ended, n_tokens, max_new_tokens, within)


def missing_package(name: str) -> str | None:
    """The pip command that would install what verifier `name` imports, if it is not installed."""
    needs = VERIFIERS[name].needs
    if needs is None or importlib.util.find_spec(needs[0]) is not None:
        return None
    return f"pip install 'llmforge[{needs[1]}]'"


def regex_problem(pattern: str) -> str | None:
    """Why a reference answer cannot be used as a regex, or None."""
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    return None
