"""What a grpo stage rewards a reply with: a weighted sum of terms, each a built-in verifier
(verifiers.py), a reward model (an earlier reward stage of the recipe, or another run's final/;
reward.py) or a plugin of an installed package (plugins.py). The recipe's `reward:` list, its
plan-time checks, and scoring a step's replies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BeforeValidator, Field, model_validator

from ..core.paths import recipe_path
from ..core.values import Float, Int, Name, Spec
from ..data import procs
from ..errors import PlanError
from . import plugins, reward
from .plugins import Reply
from .verifiers import NEEDS_ANSWER, VERIFIERS, missing_package, regex_problem, verify


class RewardTerm(Spec):
    # One reward: a built-in verifier by name, an earlier reward stage of this recipe, the final/
    # folder of another run's reward stage, or a plugin an installed package provides; rewards add
    # up, each times its weight.
    verifier: Literal[tuple(VERIFIERS)] | None = None
    stage: Name | None = None
    path: str | None = None
    plugin: str | None = Field(default=None, min_length=1)
    weight: Float = 1.0
    within: Int | None = Field(default=None, ge=0)  # length: tokens without penalty (default max_new_tokens / 2)
    options: dict = {}  # plugin: its own settings, checked by the plugin before training
    timeout: Float = Field(default=30.0, gt=0)  # plugin: seconds one reply may take
    on_error: Literal["zero", "stop"] = "zero"  # plugin: a reply it fails on scores 0 (counted), or the run stops

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.verifier, self.stage, self.path, self.plugin)) != 1:
            raise ValueError("give exactly one of verifier, stage (a reward stage), path (a reward model's final/) "
                             "or plugin (an installed package's)")
        if self.within is not None and self.verifier != "length":
            raise ValueError("within applies to the length verifier")
        # a resolved recipe spells out every default, so a key counts when it is not its default
        plugin_only = [k for k in ("options", "timeout", "on_error")
                       if getattr(self, k) != type(self).model_fields[k].default]
        if plugin_only and self.plugin is None:
            raise ValueError(f"{', '.join(plugin_only)} applies to a plugin")
        return self

    @property
    def label(self) -> str:
        return self.verifier or self.stage or self.plugin or "model"


def as_list(value):
    """One reward may be written without the list around it."""
    return [value] if isinstance(value, dict) else value


Terms = Annotated[list[RewardTerm], BeforeValidator(as_list)]


def plan_terms(terms: list[RewardTerm], base_dir: Path) -> list[RewardTerm]:
    """Reward model paths, relative to the recipe's folder, made absolute."""
    return [t if t.path is None else t.model_copy(update={"path": str(recipe_path(base_dir, t.path))}) for t in terms]


def term_problems(where: str, index: int, terms: list[RewardTerm], recipe, sources: dict,
                  fingerprint: str | None) -> list[str]:
    spec, problems = recipe.stages[index], []
    rewards = [s.name for s in recipe.stages[:index] if s.kind == reward.KIND.name]
    for j, term in enumerate(terms):
        at = f"{where}.reward[{j}]"
        if term.stage is not None and term.stage not in rewards:
            problems.append(f"{at}.stage: {term.stage!r} is not an earlier reward stage"
                            + (f" (earlier: {', '.join(rewards)})" if rewards else " (there is none before it)"))
        if term.path is not None:
            problems += _model_problems(at, Path(term.path), fingerprint)
        if term.verifier in NEEDS_ANSWER:
            problems += _answer_problems(at, term.verifier, spec, sources)
        if term.verifier is not None and (install := missing_package(term.verifier)):
            problems.append(f"{at}.verifier: {term.verifier} needs a package that is not installed ({install})")
        if term.plugin is not None:
            problems += plugin_problems(f"{at}.plugin", plugins.REWARDS, term.plugin, f"{at}", term.options)
    return problems


def plugin_problems(at: str, group: str, name: str, where: str, options: dict) -> list[str]:
    """A plugin nobody installed, one that does not load, or options it rejects."""
    try:
        plugin = plugins.find(group, name, at)
        return plugins.check_options(plugin.load(), options, where, plugin.label)
    except PlanError as e:
        return [e.message]


def plugin_notes(where: str, terms: list[RewardTerm]) -> list[str]:
    """The plan's line per plugin: which package provides it (the code that will run)."""
    out, installed = [], plugins.installed(plugins.REWARDS)
    for j, term in enumerate(terms):
        if term.plugin is not None and (plugin := installed.get(term.plugin)):
            parallel = ", in worker processes" if getattr(plugin.load(), "parallel", False) else ""
            out.append(f"{where}.reward[{j}]: plugin {plugin.name} from {plugin.package} {plugin.version} "
                       f"({plugin.target}; timeout {term.timeout:g} s a reply, on_error {term.on_error}{parallel})")
    return out


class Rewards:
    """A stage's reward terms, ready to score: reward models loaded, plugins imported."""

    def __init__(self, terms: list[RewardTerm], max_new_tokens: int, where: str):
        self.terms, self.max_new_tokens, self.where = terms, max_new_tokens, where
        self.models, self.plugins = {}, {}

    def start(self, folder: Path, device) -> None:
        for j, term in enumerate(self.terms):
            if term.stage is not None:  # a reward stage of this run: stages/NN-<name>/final
                final = next(folder.parent.glob(f"[0-9][0-9]-{term.stage}")) / "final"
                self.models[j] = reward.RewardScorer(final, device)
            elif term.path is not None:  # made absolute by the plan
                self.models[j] = reward.RewardScorer(Path(term.path), device)
            elif term.plugin is not None:
                self.plugins[j] = plugins.Scorer(plugins.find(plugins.REWARDS, term.plugin, f"{self.where}.reward[{j}]"),
                                                 term.timeout, procs.cores_of_this_rank())

    def score(self, replies: list[Reply], rows: dict, device, step: int) -> tuple[torch.Tensor, dict, list]:
        """Each reply's total reward [n], each term's reward of each reply [n] (reward/<label>, and
        a plugin's named parts reward/<label>/<part>), and the errors as (term label, reply, message)."""
        total, values_of, errors = torch.zeros(len(replies), device=device), {}, []
        for j, term in enumerate(self.terms):
            if term.verifier is not None:
                within = term.within if term.within is not None else self.max_new_tokens // 2
                values = torch.tensor([verify(term.verifier, r.text, r.answer, r.ended, r.tokens,
                                              max_new_tokens=self.max_new_tokens, within=within) for r in replies])
            elif j in self.models:
                tokens = torch.from_numpy(rows["tokens"][:, :-1]).to(device)
                values = self.models[j](tokens, torch.from_numpy(rows["length"]).to(device)).float().cpu()
            else:
                values, parts, failed = self._plugin(j, term, replies, step)
                values_of |= {f"reward/{term.label}/{k}": v for k, v in parts.items()}
                errors += [(term.label, i, why) for i, why in failed]
            values_of[f"reward/{term.label}"] = values.float()
            total += term.weight * values.float().to(device)
        return total, values_of, errors

    def _plugin(self, j: int, term: RewardTerm, replies: list[Reply], step: int):
        got = self.plugins[j]([Reply(**{**r.__dict__, "options": dict(term.options)}) for r in replies])
        return plugins.gather(got, term.on_error, f"{self.where}.reward[{j}].plugin", self.plugins[j].plugin.label,
                              step)


def _answer_problems(at: str, verifier: str, spec, sources: dict) -> list[str]:
    out = []
    for name in spec.mix:
        ex = sources[name].examples
        if ex is None or ex.answers is None:
            continue
        missing = [i for i, a in enumerate(ex.answers) if a is None]
        if missing:
            out.append(f"{at}.verifier: {verifier} checks replies against each prompt's reference answer, but "
                       f"{len(missing)} prompt(s) of data.{name} have none (first: {ex.origins(missing[0])})")
        elif verifier == "regex":
            bad = next(((i, why) for i, a in enumerate(ex.answers) if (why := regex_problem(a))), None)
            if bad:
                out.append(f"{at}.verifier: regex reads each answer as a regular expression, and "
                           f"{ex.origins(bad[0])}'s is not one ({bad[1]})")
    return out


def _model_problems(at: str, final: Path, fingerprint: str | None) -> list[str]:
    try:
        config = json.loads((final / "config.json").read_text())
    except (OSError, ValueError):
        return [f"{at}.path: {final} is not a finished stage's final/ folder (no readable config.json)"]
    if config.get("language_model") is not False:
        return [f"{at}.path: {final} holds a language model, not a reward model"]
    if fingerprint is not None and config.get("tokenizer_fingerprint") != fingerprint:
        return [f"{at}.path: the reward model in {final} was trained with another tokenizer than this run's, "
                "so it would read every id as a different token"]
    return []
