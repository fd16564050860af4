"""The built-in verifiers a grpo stage rewards replies with, chosen by name (a recipe never names
code); reward models are the other kind of reward (stages/reward.py: RewardScorer).

Every verifier scores one reply from its text, the prompt's reference answer, whether the turn
ended (the model closed it, rather than running out of max_new_tokens) and its length in tokens.
"""

from __future__ import annotations

import re

# Verifiers that check a reply against the prompt's reference answer (the data's answer field).
NEEDS_ANSWER = ("exact", "contains", "regex")
VERIFIERS = NEEDS_ANSWER + ("format", "length")


def _normal(text: str) -> str:
    return " ".join(text.split())


def verify(name: str, reply: str, answer: str | None, ended: bool, n_tokens: int, *, max_new_tokens: int,
           within: int) -> float:
    """exact: 1 if the reply is the answer (whitespace runs count as one space); contains: 1 if
    the answer is in it; regex: 1 if the answer, a Python regular expression, matches somewhere
    in it; format: 1 if the turn ended; length: 0 up to `within` tokens, then falling linearly to
    -1 at max_new_tokens (DAPO's soft overlong punishment, Yu et al. 2025)."""
    if name == "format":
        return float(ended)
    if name == "length":
        return -max(0, n_tokens - within) / max(1, max_new_tokens - within)
    if answer is None:
        return 0.0
    if name == "exact":
        return float(_normal(reply) == _normal(answer))
    if name == "contains":
        return float(_normal(answer) in _normal(reply))
    return float(re.search(answer, reply) is not None)


def regex_problem(pattern: str) -> str | None:
    """Why a reference answer cannot be used as a regex, or None."""
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    return None
