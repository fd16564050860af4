"""GRPO: online RL from rewards (Shao et al. 2024, DeepSeekMath), with DAPO's and Dr. GRPO's
variants as options.

Each step samples `group` replies to each prompt of the batch from the current policy (all of
them in one batched, KV-cached generation), scores each with a weighted sum of rewards (built-in
verifiers, stages/verifiers.py, and reward models, stages/reward.py), and normalizes the rewards
within each prompt's group into advantages A = (r - mean) / (std + 1e-4) (Dr. GRPO: r - mean).
The loss of a reply token, with ratio = pi / pi_old and the reference the stage's frozen
starting weights:

    -min(ratio A, clip(ratio, 1 - clip, 1 + clip_high) A) + kl (ref/pi - log(ref/pi) - 1)

(the KL term is DeepSeekMath's k3 estimator), averaged over each reply's tokens and then over
the replies (loss_mean: sequence, GRPO), or summed over tokens / max_new_tokens (constant,
Dr. GRPO). pi_old is the policy that sampled the replies: one update per batch of rollouts, so
pi_old is pi itself, taken from the update's own forward pass (detached), as TRL does with
num_iterations 1: the ratio is exactly 1 and its gradient the policy gradient. The sampler's own
log-probs come from another path (an incremental KV-cached decode; on a GPU in bf16 other
kernels), so using them as pi_old would make the ratio start off 1 by numerical noise and clip on
it; their gap to the update's is logged as `sampler_gap` instead. The sampling RNG is a function of (seed, stage, step, rank): a resumed stage draws the
same replies.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BeforeValidator, Field, model_validator

from ..core.paths import recipe_path
from ..core.values import Float, Int, Name, Spec
from ..data.rows import PromptRows
from ..model.generate import generate_batch, reply_texts
from ..model.kept import Kept
from ..model.weights import unwrap
from . import kind, reward
from .verifiers import NEEDS_ANSWER, VERIFIERS, regex_problem, verify


class RewardTerm(Spec):
    # One reward: a built-in verifier by name, an earlier reward stage of this recipe, or the
    # final/ folder of another run's reward stage; rewards add up, each times its weight.
    verifier: Literal[tuple(VERIFIERS)] | None = None
    stage: Name | None = None
    path: str | None = None
    weight: Float = 1.0
    within: Int | None = Field(default=None, ge=0)  # length: tokens without penalty (default max_new_tokens / 2)

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.verifier, self.stage, self.path)) != 1:
            raise ValueError("give exactly one of verifier, stage (a reward stage) or path (a reward model's final/)")
        if self.within is not None and self.verifier != "length":
            raise ValueError("within applies to the length verifier")
        return self

    @property
    def label(self) -> str:
        return self.verifier or self.stage or "model"


def _terms(value):
    """One reward may be written without the list around it."""
    return [value] if isinstance(value, dict) else value


class Options(kind.Options):
    # What a reply is rewarded for (a list of terms, or one).
    reward: Annotated[list[RewardTerm], BeforeValidator(_terms)] = []
    group: Int = Field(default=8, ge=2)  # replies sampled per prompt (TRL's default; DeepSeekMath: 64)
    max_new_tokens: Int = Field(default=64, gt=0)
    temperature: Float = Field(default=1.0, gt=0)
    top_k: Int | None = Field(default=None, gt=0)
    kl: Float = Field(default=0.04, ge=0)  # the KL penalty's weight (DeepSeekMath; DAPO: 0)
    clip: Float = Field(default=0.2, gt=0, lt=1)  # PPO's epsilon
    clip_high: Float | None = Field(default=None, gt=0)  # DAPO's clip-higher (0.28); default: clip
    scale_rewards: bool = True  # divide by the group's std (GRPO); false: Dr. GRPO
    loss_mean: Literal["sequence", "constant"] = "sequence"  # GRPO; constant: Dr. GRPO


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class Objective(kind.Objective):
    def __init__(self, sp, tokenizer, template, seed: int):
        self.sp, self.o, self.tokenizer, self.seed = sp, sp.options, tokenizer, seed
        self.stop_ids = tuple(template.stop_ids(tokenizer))
        self.reference, self.scorers = None, {}

    def units(self, batch: dict) -> int:
        return len(batch["prompt"]) * self.o.group

    def start(self, model, folder, device):
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        for term in self.o.reward:
            if term.stage is not None:  # a reward stage of this run: stages/NN-<name>/final
                final = next(folder.parent.glob(f"[0-9][0-9]-{term.stage}")) / "final"
                self.scorers[term.label] = reward.RewardScorer(final, device)
            elif term.path is not None:  # made absolute by the plan
                self.scorers[term.label] = reward.RewardScorer(Path(term.path), device)

    @torch.no_grad()
    def rollout(self, model, batch, device, amp, step, rank):
        o, B = self.o, len(batch["prompt"])
        generator = torch.Generator(device=device).manual_seed(_seed(self.seed, self.sp.index, step, rank))
        prompts = {k: np.repeat(v, o.group, axis=0) for k, v in batch.items()}  # each prompt G times, in a row
        was_training = model.training
        model.eval()
        with amp:
            replies = self._sample(model, prompts, device, o.temperature, generator)
        model.train(was_training)
        rows = self._rows(prompts, replies)
        with amp:  # reward models score under the run's precision
            rewards, terms = self._score(prompts, replies, rows, device)
        groups = rewards.view(B, o.group)
        advantages = groups - groups.mean(dim=1, keepdim=True)
        if o.scale_rewards:
            advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-4)
        # The sampler's log-prob of each reply token, at its target position (replies fill their rows' learned
        # positions in order).
        sampled = torch.arange(replies["logps"].shape[1], device=replies["n"].device) < replies["n"][:, None]
        rows["old"] = Kept.of(rows["learned"]).spread(replies["logps"][sampled].cpu()).numpy()
        with amp:
            rows["ref"] = self._logps(self.reference, rows)
        rows["advantage"] = advantages.flatten().cpu().numpy().astype(np.float32)
        n = replies["n"].float()
        figures = {"reward": rewards.mean(), "reward_std": rewards.std(), "reply_tokens": n.mean(),
                   "ended": replies["ended"].float().mean(),
                   "zero_std_groups": (groups.std(dim=1) == 0).float().mean()}
        for label, values in terms.items():
            figures |= {f"reward/{label}": values.mean(), f"reward/{label}_std": values.std()}
        return rows, {k: float(v) for k, v in figures.items()}

    def _sample(self, model, prompts, device, temperature, generator) -> dict:
        return generate_batch(model, torch.from_numpy(prompts["prompt"]).to(device),
                              torch.from_numpy(prompts["prompt_len"]).to(device), self.o.max_new_tokens,
                              temperature=temperature, top_k=self.o.top_k, generator=generator,
                              stop_ids=self.stop_ids, vocab_limit=self.tokenizer.vocab_size)

    def _score(self, prompts, replies, rows, device) -> tuple[torch.Tensor, dict]:
        """Each reply's total reward [B] and each term's [B]."""
        o, n, ended = self.o, replies["n"].tolist(), replies["ended"].tolist()
        texts = reply_texts(self.tokenizer, replies, self.stop_ids)
        answers = [None if k < 0 else bytes(a[:k]).decode("utf-8", "replace")
                   for a, k in zip(prompts["answer"], prompts["answer_len"].tolist())]
        terms, total = {}, torch.zeros(len(n), device=device)
        for term in o.reward:
            if term.verifier is not None:
                within = term.within if term.within is not None else o.max_new_tokens // 2
                values = torch.tensor([verify(term.verifier, t, a, e, k, max_new_tokens=o.max_new_tokens,
                                              within=within) for t, a, e, k in zip(texts, answers, ended, n)],
                                      device=device)
            else:
                tokens = torch.from_numpy(rows["tokens"][:, :-1]).to(device)
                values = self.scorers[term.label](tokens, torch.from_numpy(rows["length"]).to(device))
            terms[term.label] = values.float()
            total += term.weight * values.float()
        return total, terms

    def _rows(self, prompts, replies) -> dict:
        """tokens [B, T+1]: prompt then reply, right-padded; learned [B, T]: the reply's targets."""
        T, n = self.sp.seq_len, replies["n"].cpu().numpy()
        new, lengths = replies["new"].cpu().numpy(), prompts["prompt_len"]
        tokens = np.zeros((len(n), T + 1), dtype=np.int64)
        learned = np.zeros((len(n), T), dtype=bool)
        for i in range(len(n)):
            p, k = lengths[i], n[i]
            tokens[i, :p], tokens[i, p:p + k] = prompts["prompt"][i, :p], new[i, :k]
            learned[i, p - 1:p - 1 + k] = True
        return {"tokens": tokens, "learned": learned, "length": (lengths + n).astype(np.int64)}

    def _logps(self, model, rows) -> np.ndarray:
        """[B, T] log-probabilities (at the sampling temperature) of the reply tokens, 0 elsewhere."""
        out = np.zeros(rows["learned"].shape, dtype=np.float32)
        device = next(model.parameters()).device
        for idx in kind.split_rows(len(out), self.sp.micro_batch * self.o.group):
            batch = kind.to_device({k: rows[k][idx] for k in ("tokens", "learned")}, device)
            got = batch["learned"].spread(self.token_logps(model, batch)).cpu().numpy()
            out[idx, :got.shape[1]] = got  # the micro-batch was trimmed to its longest reply
        return out

    def token_logps(self, model, batch) -> torch.Tensor:
        """[N] log-probabilities of the learned targets, in row order."""
        return model(batch["tokens"][:, :-1], keep=batch["learned"], targets=batch["tokens"][:, 1:],
                     temperature=self.o.temperature)

    def loss(self, model, batch):
        batch = batch | {"learned": Kept.of(batch["learned"])}  # found on the host by to_device
        o, learned = self.o, batch["learned"]
        logp = self.token_logps(model, batch)
        old, ref = logp.detach(), learned.take(batch["ref"])  # pi_old: this very forward (see the docstring)
        advantage = batch["advantage"][learned.rows]
        ratio = torch.exp(logp - old)
        low, high = 1 - o.clip, 1 + (o.clip_high if o.clip_high is not None else o.clip)
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(low, high) * advantage)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        weight = 1 / learned.counts().clamp(min=1)[learned.rows] if o.loss_mean == "sequence" else \
            torch.full_like(logp, 1 / o.max_new_tokens)
        clipped = ((ratio < low) & (advantage < 0)) | ((ratio > high) & (advantage > 0))
        gap = (old - learned.take(batch["old"])).abs()  # the sampler's log-probs against the update's
        return {"loss": ((o.kl * kl - surrogate) * weight).sum(), "kl": (kl.detach() * weight).sum(),
                "clip_frac": (clipped.float() * weight).sum(), "sampler_gap": (gap * weight).sum()}

    def eval_sums(self, model, batch):
        """Held-out prompts, one greedy reply each, scored by the stage's rewards."""
        prompts, device = {k: v.cpu().numpy() for k, v in batch.items()}, batch["prompt"].device
        replies = self._sample(unwrap(model), prompts, device, 0, None)
        rewards, terms = self._score(prompts, replies, self._rows(prompts, replies), device)
        return {"reward": rewards.sum().item(), "reply_tokens": replies["n"].sum().item(),
                "ended": replies["ended"].sum().item(), "prompts": len(rewards)} \
            | {f"reward/{k}": v.sum().item() for k, v in terms.items()}

    @staticmethod
    def summarize(sums):
        n = sums.get("prompts")
        return {k: v / n for k, v in sums.items() if k != "prompts"} if n else {}


class Grpo(kind.Kind):
    name, formats, Options = "grpo", ("prompt",), Options
    learns = "room for a reply"
    # Each rank decodes until its own replies end, one forward a token: under FSDP every forward
    # all-gathers the weights, and ranks that stop at different steps stop pairing their collectives.
    unsharded = ("grpo's rollout runs a forward per generated token until this rank's replies end, so under fsdp "
                 "the ranks' weight all-gathers stop pairing up (a hang)")

    def sequences(self, options, data_format=None):
        return options.group  # a row is a prompt; its step holds `group` replies to it

    def memory_beside(self, options, cfg, rows, seq_len, act_bytes, weights):
        """The frozen reference (a copy of the weights) and each reward model (assumed the policy's
        size) are held throughout; the rollout holds the KV cache of all `rows` x group replies
        (each layer's copied once as it grows, attention.KVCache) and a few [replies, vocab] fp32
        logits a token."""
        replies = rows * options.group
        kv = 2 * cfg.n_layer * replies * seq_len * cfg.kv_heads * cfg.head_dim * act_bytes
        scorers = sum(t.stage is not None or t.path is not None for t in options.reward)
        return (1 + scorers) * weights, kv * (1 + 1 / cfg.n_layer) + 3 * replies * cfg.vocab_size * 4

    def rows(self, examples, seq_len, options, seed, overlong=None):
        return PromptRows(examples, seq_len, room=options.max_new_tokens, seed=seed)

    def longest(self, examples, options):
        return super().longest(examples, options) + options.max_new_tokens + 1  # prompt + reply fit seq_len

    def preview(self, template, example, options):
        messages, answer = example
        return template.prompt_segments(messages) + ([(f"  answer: {answer}", True, False)] if answer else [])

    def plan_options(self, spec, recipe):
        """Reward model paths, relative to the recipe's folder, made absolute."""
        o = spec.options
        terms = [t if t.path is None else t.model_copy(update={"path": str(recipe_path(recipe.base_dir, t.path))})
                 for t in o.reward]
        return o.model_copy(update={"reward": terms})

    def check(self, where, index, o, recipe, sources, fingerprint):
        spec, problems = recipe.stages[index], []
        if not o.reward:
            problems.append(f"{where}.reward: a grpo stage needs a reward: a verifier ({', '.join(VERIFIERS)}), "
                            "a reward stage, or a reward model's final/ folder")
        if o.max_new_tokens >= recipe.stage_seq_len(spec):
            problems.append(f"{where}.max_new_tokens: {o.max_new_tokens} leaves no room for a prompt in "
                            f"seq_len {recipe.stage_seq_len(spec)}")
        rewards = [s.name for s in recipe.stages[:index] if s.kind == reward.KIND.name]
        for j, term in enumerate(o.reward):
            at = f"{where}.reward[{j}]"
            if term.stage is not None and term.stage not in rewards:
                problems.append(f"{at}.stage: {term.stage!r} is not an earlier reward stage"
                                + (f" (earlier: {', '.join(rewards)})" if rewards else " (there is none before it)"))
            if term.path is not None:
                problems += _model_problems(at, Path(term.path), fingerprint)
            if term.verifier in NEEDS_ANSWER:
                problems += _answer_problems(at, term.verifier, spec, sources)
        return problems

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp, tokenizer, template, seed)


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


KIND = Grpo()
