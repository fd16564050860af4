"""Multi-turn environments for grpo: the policy replies; a tool call in its reply (read as the
model's own chat template writes calls, text/toolcalls.py) is run by the environment, its result
appended as a tool turn, and the policy goes on, up to max_turns; then the environment may give a
reward of its own. One is built in (`calculator`); others come from installed packages under the
entry-point group `llmforge.environments` (plugins.py).

An environment is an object with
  tools                        the tool definitions (JSON schema, as for apply_chat_template(tools=...))
  call(name, arguments, episode) -> str   one tool call's result (raising: its error is the result,
                                          counted in tool_errors)
  reward(episode) -> float | dict | None  at the end (None: the recipe's reward terms alone)
  check(options)               optional, at plan time, as for reward plugins.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from ..core.values import Float, Int, Spec
from ..errors import PlanError
from . import plugins


class EnvironmentSpec(Spec):
    name: str = Field(min_length=1)  # `calculator` (built in), or an installed package's
    max_turns: Int = Field(default=4, ge=1)  # policy turns per conversation (tool results between them)
    weight: Float = 1.0  # of the environment's own reward, added to the reward terms'
    options: dict = {}  # its own settings, checked by its check() before training
    timeout: Float = Field(default=30.0, gt=0)  # seconds one tool call or the reward may take
    on_error: Literal["zero", "stop"] = "zero"  # the environment's reward failing: 0 (counted), or the run stops


@dataclass
class Episode:
    """One conversation as the environment sees it."""
    record: dict  # the prompt's record (every field)
    messages: list  # the conversation so far: the prompt's messages, the policy's turns, tool turns
    options: dict
    seed: int  # the same on a resumed run
    state: dict = field(default_factory=dict)  # the environment's own, for the length of the conversation
    tool_calls: int = 0
    tool_errors: int = 0  # calls that did not parse or whose tool failed


# --- the built-in calculator ------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node):
    """Arithmetic only: numbers, + - * / // % ** and parentheses (never Python's eval)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers and + - * / // % ** ( ) are allowed")


class Calculator:
    """One tool, `calculator(expression)`: the value of an arithmetic expression."""
    tools = [{"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression, e.g. (12 + 7) * 3",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]

    def check(self, options):
        if options:
            raise ValueError(f"calculator takes no options (got {', '.join(options)})")

    def call(self, name, arguments, episode) -> str:
        if name != "calculator":
            raise ValueError(f"no tool {name!r} (the tool is calculator)")
        value = _evaluate(ast.parse(str(arguments.get("expression", "")), mode="eval"))
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError("the result is not a finite number")
            value = int(value) if value.is_integer() else round(value, 10)
        return str(value)

    def reward(self, episode):
        return None  # a tool, not a judge: the recipe's reward terms score the final answer


BUILT_IN = {"calculator": Calculator()}


@dataclass(frozen=True)
class Found:
    env: object
    label: str  # "calculator (built in)", "name (package version)"
    timeout: float


def find(spec: EnvironmentSpec, at: str) -> Found:
    """The environment `spec` names: built in, or an installed package's."""
    if spec.name in BUILT_IN:
        return Found(BUILT_IN[spec.name], f"{spec.name} (built in)", spec.timeout)
    installed = plugins.installed(plugins.ENVIRONMENTS)
    if spec.name not in installed:
        have = ", ".join(sorted([*BUILT_IN, *installed]))
        raise PlanError(f"{at}.name: no environment {spec.name!r} is built in or installed (there are: {have})",
                        hint="pip install the package that declares it under the entry-point group "
                             f"{plugins.ENVIRONMENTS!r} (docs/rl.md shows how to write one)")
    plugin = installed[spec.name]
    return Found(plugin.load(), plugin.label, spec.timeout)


def problems(spec: EnvironmentSpec, at: str) -> list[str]:
    try:
        found = find(spec, at)
    except PlanError as e:
        return [e.message]
    missing = [k for k in ("tools", "call", "reward") if not hasattr(found.env, k)]
    if missing:
        return [f"{at}.name: {found.label} is not an environment (it has no {', '.join(missing)})"]
    return plugins.check_options(found.env, spec.options, at, found.label)


def call_tool(found: Found, name: str, arguments: dict, episode: Episode) -> str:
    """A tool call's result; a failing tool's error becomes the result the policy reads."""
    try:
        with plugins.deadline(found.timeout):
            return str(found.env.call(name, arguments, episode))
    except Exception as e:  # noqa: BLE001 - the tool failing is part of the episode, never fatal
        episode.tool_errors += 1
        return f"error: {type(e).__name__}: {e}"
