"""Code from installed packages: reward plugins (entry-point group `llmforge.rewards`) and
environments (`llmforge.environments`), found by name the way pytest finds its plugins. A recipe
names one and never the code itself, so a recipe from a stranger still runs only what this
machine's user installed.

A reward plugin's entry point names a function `score(reply) -> float | dict[str, float]`, or an
object (a module, a class instance) with `score`, and optionally `check(options)` (raise
ValueError, or return a list of problems, for options it rejects: run at plan time, before any
training) and `parallel = True` (score in worker processes). `reply` is a `Reply`. A dict's values
are each logged (reward/<plugin>/<key>) and the reward is their sum.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from importlib import metadata

import torch

from ..data import procs
from ..errors import PlanError, TrainingError

REWARDS, ENVIRONMENTS = "llmforge.rewards", "llmforge.environments"
_BACKSTOP_S = 30  # past the replies' own timeouts, how long a parallel batch may take before its workers are killed


@dataclass
class Reply:
    """What a reward plugin scores: one reply, with everything a check may need."""
    record: dict  # the prompt's record as the data file has it (every field, not only the answer)
    text: str  # the reply (an environment's: the policy's last turn), without the token that ended it
    tokens: int  # tokens the policy generated for it (all its turns)
    ended: bool  # the model closed its turn (rather than running out of max_new_tokens)
    seed: int  # the same on a resumed run: a plugin that samples (a judge, a test order) uses it
    answer: str | None = None  # the prompt's reference answer (data.<name>.answer_field), if it has one
    options: dict = field(default_factory=dict)  # the recipe's options for this plugin
    messages: list = field(default_factory=list)  # the whole conversation, the reply last (environments: tool turns too)


@dataclass(frozen=True)
class Plugin:
    name: str
    group: str
    package: str  # the distribution that provides it, and its version (the plan names both)
    version: str
    target: str  # module:attribute

    def load(self):
        """The entry point's object; a package that fails to import is the user's to fix: one line."""
        ep = next(e for e in metadata.entry_points(group=self.group) if e.name == self.name)
        try:
            return ep.load()
        except Exception as e:  # noqa: BLE001 - any import failure of someone else's package
            raise PlanError(f"{self.label}: loading {self.target} failed: {type(e).__name__}: {e}",
                            hint=f"check that {self.package} imports (python -c 'import {self.target.split(':')[0]}')")

    @property
    def label(self) -> str:
        return f"{self.name} ({self.package} {self.version})"


def installed(group: str) -> dict[str, Plugin]:
    """Every plugin of `group` the installed packages declare, by name (the first of a repeated one)."""
    out: dict[str, Plugin] = {}
    for ep in metadata.entry_points(group=group):
        dist = ep.dist
        out.setdefault(ep.name, Plugin(ep.name, group, dist.metadata["Name"] if dist else "?",
                                       dist.version if dist else "?", ep.value))
    return out


def find(group: str, name: str, at: str) -> Plugin:
    """The installed plugin `name`, or the plan error listing those that exist."""
    found = installed(group)
    if name in found:
        return found[name]
    what = "reward plugin" if group == REWARDS else "environment"
    have = ", ".join(sorted(found)) or "none"
    raise PlanError(f"{at}: no installed package provides the {what} {name!r} (installed: {have})",
                    hint=f"pip install the package that declares it under the entry-point group {group!r} "
                         "(docs/rl.md shows how to write one)")


def check_options(obj, options: dict, at: str, label: str) -> list[str]:
    """The plugin's own check of its options, as plan problems."""
    check = getattr(obj, "check", None)
    if check is None:
        return []
    try:
        problems = check(dict(options))
    except (ValueError, TypeError, KeyError) as e:
        return [f"{at}.options: {label} rejects them: {e}"]
    return [f"{at}.options: {label}: {p}" for p in problems or []]


def score_function(obj):
    return getattr(obj, "score", obj)


# --- scoring replies, with a timeout per reply ------------------------------------------------------

class Scorer:
    """Scores replies with one plugin: in this process, or (parallel) in worker processes. A reply
    whose scoring raises or runs past `timeout` seconds scores None (with the error's last line);
    `stop` raises instead, after printing the plugin's traceback."""

    def __init__(self, plugin: Plugin, timeout: float, workers: int):
        self.plugin, self.timeout, self.workers = plugin, timeout, workers
        obj = plugin.load()
        self.score, self.parallel = score_function(obj), bool(getattr(obj, "parallel", False)) and workers > 1
        self._pool = None

    def __call__(self, replies: list[Reply]) -> list[tuple[object, str | None]]:
        """Per reply: (its value, None) or (None, why it has none)."""
        if not self.parallel:
            return [score_safely(self.score, r, self.timeout) for r in replies]
        if self._pool is None:  # spawn, not fork: this process holds torch's thread pools
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_init_worker,
                                                                   initargs=(self.plugin,))
        pending = self._pool.map_async(_score_in_worker, [(r, self.timeout) for r in replies], chunksize=1)
        try:  # each reply's timeout holds inside its worker; this catches code that never returns to Python
            return pending.get(self.timeout * math.ceil(len(replies) / self.workers) + _BACKSTOP_S)
        except multiprocessing.TimeoutError:
            self.close()
            return [(None, f"TimeoutError: the batch's workers did not finish within {self.timeout:g} s a reply")
                    for _ in replies]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None


def score_safely(score, reply, timeout: float, optional: bool = False) -> tuple[object, str | None]:
    """(score(reply), None), or (None, the error's last line, a newline, its traceback). optional: None
    is a value (an environment without a reward of its own)."""
    try:
        with deadline(timeout):
            got = score(reply)
            return (None, None) if optional and got is None else (_value(got), None)
    except Exception as e:  # noqa: BLE001 - a plugin's failure is counted, never fatal unless on_error: stop
        return None, "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1] + \
            "\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _value(got) -> float | dict:
    """A float, or a dict of named floats (each checked: a NaN or a string is the plugin's error)."""
    if isinstance(got, dict):
        out = {str(k): float(v) for k, v in got.items()}
        bad = [k for k, v in out.items() if not math.isfinite(v)]
    else:
        out, bad = float(got), [] if math.isfinite(float(got)) else ["the value"]
    if bad:
        raise ValueError(f"the score is not a finite number ({', '.join(bad)})")
    return out


class deadline:
    """Raise TimeoutError in the scoring call after `seconds` (a SIGALRM timer: the main thread of
    a Unix process only; elsewhere no limit). Python-level code, sleeps and waits are interrupted."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.armed:
            self.old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def _fire(self, signum, frame):
        raise TimeoutError(f"took longer than timeout: {self.seconds:g} s")

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)


_WORKER_SCORE = None


def _init_worker(plugin: Plugin) -> None:
    global _WORKER_SCORE
    threading.Thread(target=procs.exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    _WORKER_SCORE = score_function(plugin.load())


def _score_in_worker(args) -> tuple[object, str | None]:
    reply, timeout = args
    return score_safely(_WORKER_SCORE, reply, timeout)


def gather(got: list[tuple[object, str | None]], on_error: str, at: str, label: str, step: int):
    """Per-reply (value, error) pairs -> (values [n]: a dict's sum, 0 for none or a failure; each
    named part's values; the failures as (reply, the error's first line)). on_error "stop" raises
    at the first failure instead."""
    values, parts, failures = torch.zeros(len(got)), {}, []
    for i, (value, why) in enumerate(got):
        if why is not None:
            if on_error == "stop":
                raise failed(at, label, step, why)
            failures.append((i, why.partition("\n")[0]))
        elif isinstance(value, dict):
            values[i] = sum(value.values())
            for k, v in value.items():
                parts.setdefault(k, torch.zeros(len(got)))[i] = v
        elif value is not None:
            values[i] = value
    return values, parts, failures


def failed(at: str, label: str, step: int, error: str) -> TrainingError:
    """on_error: stop: the plugin's traceback, then the one line saying where it happened."""
    first, _, trace = error.partition("\n")
    print(trace, end="", file=sys.stderr, flush=True)
    when = f"step {step}" if step >= 0 else "the held-out eval"
    return TrainingError(f"{at}: {label} failed on a reply of {when}: {first}",
                         hint="its traceback is above; on_error: zero scores such a reply 0, counts it and goes on")
