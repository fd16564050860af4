"""GRPO: online RL from rewards (Shao et al. 2024, DeepSeekMath), with DAPO's, Dr. GRPO's, GSPO's
and CISPO's variants as options.

Each step samples `group` replies to each prompt of the batch from the current policy (all of
them in one batched, KV-cached generation), scores each with a weighted sum of rewards
(stages/rewards.py: built-in verifiers, reward models, plugins of installed packages), and
normalizes the rewards within each prompt's group into advantages A = (r - mean) / (std + 1e-4)
(Dr. GRPO: r - mean). The policy loss of the reply tokens is stages/rl_loss.py's.

pi_old is the policy that sampled the replies. With one update per batch of rollouts, pi_old is
pi itself, taken from the update's own forward pass (detached), as TRL does with num_iterations
1: the ratio is exactly 1 and its gradient the policy gradient. The sampler's own log-probs come
from another path (an incremental KV-cached decode; on a GPU in bf16 other kernels), so using
them as pi_old would make the ratio start off 1 by numerical noise and clip on it; their gap to
the update's is logged as `sampler_gap` instead. With updates_per_rollout > 1, pi_old is one
forward of the policy over the replies before the first update. The sampling RNG, and each
reply's seed given to plugins, are functions of (seed, stage, step, rank): a resumed stage draws
the same replies and scores them alike.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..core.values import Float, Int
from ..data.rows import PromptRows
from ..model.generate import generate_batch, reply_texts
from ..model.kept import Kept
from ..model.weights import unwrap
from ..errors import TokenizerError, TrainingError
from ..text.toolcalls import ToolCallFormat
from . import kind
from . import environments, episodes, plugins
from .environments import EnvironmentSpec
from .plugins import Reply
from .rewards import Rewards, Terms, plan_terms, plugin_notes, term_problems
from .rl_loss import LOSSES, policy_loss
from .verifiers import VERIFIERS


class Options(kind.Options):
    # What a reply is rewarded for (a list of terms, or one): verifiers, reward models, plugins.
    reward: Terms = []
    group: Int = Field(default=8, ge=2)  # replies sampled per prompt (TRL's default; DeepSeekMath: 64)
    max_new_tokens: Int = Field(default=64, gt=0)
    temperature: Float = Field(default=1.0, gt=0)
    top_k: Int | None = Field(default=None, gt=0)
    policy_loss: Literal[LOSSES] = "grpo"  # the policy loss (stages/rl_loss.py): grpo, gspo (Zheng et al. 2025), cispo (MiniMax-M1)
    kl: Float = Field(default=0.04, ge=0)  # the KL penalty's weight (DeepSeekMath; DAPO: 0)
    clip: Float = Field(default=0.2, gt=0, lt=1)  # PPO's epsilon
    clip_high: Float | None = Field(default=None, gt=0)  # DAPO's clip-higher (0.28); default: clip
    scale_rewards: bool = True  # divide by the group's std (GRPO); false: Dr. GRPO
    loss_mean: Literal["sequence", "constant"] = "sequence"  # GRPO; constant: Dr. GRPO
    updates_per_rollout: Int = Field(default=1, ge=1)  # optimizer steps on each batch of replies (TRL's num_iterations)
    dynamic_sampling: bool = False  # DAPO: groups whose replies all score alike are replaced by new prompts'
    max_rollouts: Int = Field(default=4, ge=1)  # dynamic sampling: batches of prompts rolled out a step, at most
    environment: EnvironmentSpec | None = None  # multi-turn: tools the policy may call (stages/environments.py)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class Objective(kind.Objective):
    def __init__(self, sp, tokenizer, template, seed: int):
        self.sp, self.o, self.tokenizer, self.seed = sp, sp.options, tokenizer, seed
        self.stop_ids, self.template = tuple(template.stop_ids(tokenizer)), template
        self.reference, self.folder = None, None
        at = f"stages[{sp.index}].environment"
        self.environment = environments.find(self.o.environment, at) if self.o.environment else None
        self.calls = ToolCallFormat.of(template) if self.o.environment else None
        self.rewards = Rewards(self.o.reward, self.o.max_new_tokens, f"stages[{sp.index}]")
        self.updates = self.o.updates_per_rollout  # the step's optimizer steps on its rollout (run/step.py)

    def units(self, batch: dict) -> int:
        return len(batch["prompt"]) * self.o.group

    def start(self, model, folder, device):
        self.reference, self.folder = copy.deepcopy(model).eval().requires_grad_(False), folder
        self.rewards.start(folder, device)

    @torch.no_grad()
    def rollout(self, model, batch, device, amp, step, rank, refill=None):
        """The step's replies, scored, as rows. Under dynamic sampling, groups whose replies all
        scored alike teach nothing (their advantages are 0): they are set aside and the next
        prompts rolled out instead, up to max_rollouts batches; if still short, set-aside groups
        fill the rest (their KL term alone trains)."""
        o, B = self.o, len(batch["prompt"])
        generator = torch.Generator(device=device).manual_seed(_seed(self.seed, self.sp.index, step, rank))
        rounds = [self._roll(model, batch, device, amp, generator, (step, rank, 0))]
        while o.dynamic_sampling and len(rounds) < o.max_rollouts:
            more = refill(sum(r["informative"].sum() for r in rounds) < B) if refill else None
            if more is None:
                break
            rounds.append(self._roll(model, more, device, amp, generator, (step, rank, len(rounds))))
        rows = _keep_groups(rounds, B, o.group) if o.dynamic_sampling else rounds[0]["rows"]
        with amp:
            rows["ref"] = self._logps(self.reference, rows)
            if self.updates > 1:  # pi_old: the policy as it sampled, once for all the updates on this batch
                rows["old"] = self._logps(model, rows)
        # A round whose replies all failed a plugin has none of its named parts: 0, as for a failed reply.
        values = {k: torch.cat([r["values"].get(k, torch.zeros(len(r["values"]["reward"]))) for r in rounds])
                  for k in dict.fromkeys(k for r in rounds for k in r["values"])}
        figures = {k: v.mean() for k, v in values.items()} | \
            {f"{k}_std": v.std() for k, v in values.items() if k == "reward" or k.count("/") == 1}
        figures["reward_errors"] = sum(r["errors"] for r in rounds)
        figures["generate_s"] = sum(r["generate_s"] for r in rounds)  # of rollout_s: sampling (the rest: scoring, ref)
        figures["zero_std_groups"] = (~rounds[0]["informative"]).mean()
        if o.dynamic_sampling:
            figures["refills"] = len(rounds) - 1
        return rows, {k: float(v) for k, v in figures.items()}

    def _roll(self, model, batch, device, amp, generator, where) -> dict:
        """One batch of prompts' replies: rows (with advantages), each reply's scores, and which
        groups' rewards differ (inform)."""
        o, B = self.o, len(batch["prompt"])
        prompts = {k: np.repeat(v, o.group, axis=0) for k, v in batch.items()}  # each prompt G times, in a row
        was_training, started = model.training, time.perf_counter()
        model.eval()
        with amp:
            rows, replies, values = self._generate(model, prompts, device, o.temperature, generator, where)
        model.train(was_training)
        generated = time.perf_counter() - started
        with amp:  # reward models score under the run's precision
            rewards, values, failed = self._score(replies, rows, values, device, where)
        groups = rewards.view(B, o.group)
        advantages = groups - groups.mean(dim=1, keepdim=True)
        if o.scale_rewards:
            advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-4)
        rows["advantage"] = advantages.flatten().cpu().numpy().astype(np.float32)
        return {"rows": rows, "values": values, "errors": failed, "informative": (groups.std(dim=1) > 0).numpy(),
                "generate_s": generated}

    def _generate(self, model, prompts, device, temperature, generator, where) -> tuple[dict, list, dict]:
        """Replies to `prompts` (one turn, or conversations with the environment): their rows
        (with the sampler's log-probs of the learned tokens), each as a Reply, and figures per reply."""
        answers = [None if k < 0 else bytes(a[:k]).decode("utf-8", "replace")
                   for a, k in zip(prompts["answer"], prompts["answer_len"].tolist())]
        seeds = [_seed(self.seed, self.sp.index, *where, i) for i in range(len(answers))]
        if self.environment is not None:
            return self._converse(model, prompts, answers, seeds, temperature, generator, where)
        got = generate_batch(model, torch.from_numpy(prompts["prompt"]).to(device),
                             torch.from_numpy(prompts["prompt_len"]).to(device), self.o.max_new_tokens,
                             temperature=temperature, top_k=self.o.top_k, generator=generator,
                             stop_ids=self.stop_ids, vocab_limit=self.tokenizer.vocab_size)
        rows = self._rows(prompts, got)
        # The sampler's log-prob of each reply token, at its target position (replies fill their rows' learned
        # positions in order): compared with the update's own as sampler_gap.
        sampled = torch.arange(got["logps"].shape[1], device=got["n"].device) < got["n"][:, None]
        rows["sampled"] = Kept.of(rows["learned"]).spread(got["logps"][sampled].cpu()).numpy()
        texts, n, ended = reply_texts(self.tokenizer, got, self.stop_ids), got["n"].tolist(), got["ended"].tolist()
        replies = [Reply(record=rec, text=t, tokens=k, ended=e, seed=seed, answer=a,
                         messages=list(m) + [{"role": "assistant", "content": t}])
                   for rec, m, t, k, e, a, seed in zip(prompts["record"], prompts["messages"], texts, n, ended,
                                                       answers, seeds)]
        return rows, replies, {"reply_tokens": got["n"].float().cpu(), "ended": got["ended"].float().cpu()}

    def _converse(self, model, prompts, answers, seeds, temperature, generator, where) -> tuple[dict, list, dict]:
        """Conversations with the environment, all turns; its own reward (if it gives one) as
        values["total"] (weighted), reward/<name> and its named parts reward/<name>/<part>, its
        failures as values["errors"] (environment, reply, message), and how the tools were used."""
        spec, found = self.o.environment, self.environment
        talks = [episodes.start(self.template, self.tokenizer, found, m, rec, spec.options, seed)
                 for m, rec, seed in zip(prompts["messages"], prompts["record"], seeds)]
        if all(len(c.ids) >= self.sp.seq_len for c in talks):  # one too long is counted; all: seq_len is wrong
            shortest, at = min(len(c.ids) for c in talks), f"stages[{self.sp.index}].seq_len"
            need = shortest + spec.max_turns * self.o.max_new_tokens
            raise TrainingError(f"{at}: {self.sp.seq_len} tokens hold none of these prompts with {found.label}'s "
                                f"tool list (the shortest is {shortest} tokens before any reply)",
                                hint=f"set {at} to about {-(-need // 64) * 64} (the prompt with the tools, then "
                                     f"max_turns x max_new_tokens = {spec.max_turns} x {self.o.max_new_tokens}, "
                                     "and the tools' results) and run again")
        episodes.roll(model, talks, template=self.template, tokenizer=self.tokenizer, found=found, fmt=self.calls,
                      seq_len=self.sp.seq_len, max_turns=spec.max_turns, max_new_tokens=self.o.max_new_tokens,
                      temperature=temperature, top_k=self.o.top_k, generator=generator, stop_ids=self.stop_ids)
        replies = [Reply(record=c.episode.record, text=c.reply, tokens=c.tokens, ended=c.ended, seed=seed, answer=a,
                         messages=c.episode.messages) for c, a, seed in zip(talks, answers, seeds)]
        values = {k: torch.tensor([float(f(c)) for c in talks]) for k, f in (
            ("reply_tokens", lambda c: c.tokens), ("ended", lambda c: c.ended),
            ("tool_calls", lambda c: c.episode.tool_calls), ("tool_errors", lambda c: c.episode.tool_errors),
            ("turns", lambda c: c.turns), ("too_long", lambda c: c.extra["too_long"]))}
        got = [plugins.score_safely(found.env.reward, c.episode, spec.timeout, optional=True) for c in talks]
        if any(v is not None or why for v, why in got):
            own, parts, failures = plugins.gather(got, spec.on_error, f"stages[{self.sp.index}].environment",
                                                  found.label, where[0])
            values |= {f"reward/{spec.name}/{k}": v for k, v in parts.items()}
            values |= {f"reward/{spec.name}": own, "total": spec.weight * own,
                       "errors": [(spec.name, i, why) for i, why in failures]}
        return episodes.rows(talks, self.sp.seq_len), replies, values

    def _score(self, replies, rows, values, device, where) -> tuple[torch.Tensor, dict, int]:
        """Each reply's total reward [n] (the terms' and the environment's own), every value to log
        (`values` with the terms' added), and how many rewards failed: plugins' and the
        environment's alike, each a line in the stage's reward_errors.jsonl (their author wants
        to see them)."""
        total, scores, errors = self.rewards.score(replies, rows, device, where[0])
        total = total.cpu() + values.pop("total", 0)
        errors += values.pop("errors", [])
        if errors and self.folder is not None:
            with open(self.folder / "reward_errors.jsonl", "a") as f:
                for label, i, why in errors:
                    f.write(json.dumps({"step": where[0] if where[0] >= 0 else "eval", "rank": where[1],
                                        "reward": label, "reply": i, "error": why}) + "\n")
        return total, values | scores | {"reward": total}, len(errors)

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
        learned = batch["learned"]
        logp = self.token_logps(model, batch)
        # pi_old: with one update per rollout, this very forward (detached: the ratio is exactly 1; the
        # sampler's own log-probs come from another kernel path, see the docstring); with more, the
        # policy as it sampled, taken once in rollout.
        old = learned.take(batch["old"]) if self.updates > 1 else logp.detach()
        out = policy_loss(logp, old, learned.take(batch["ref"]), batch["advantage"][learned.rows], learned.rows,
                          learned.counts(), self.o)
        gap = (logp.detach() - learned.take(batch["sampled"])).abs()  # the sampler's log-probs against the update's
        return out | {"sampler_gap": (gap / learned.counts().clamp(min=1)[learned.rows]).sum()}

    def eval_sums(self, model, batch):
        """Held-out prompts, one greedy reply each (a greedy conversation with an environment),
        scored by the stage's rewards."""
        prompts = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        where = (-1, 0, 0)
        rows, replies, values = self._generate(unwrap(model), prompts, batch["prompt"].device, 0, None, where)
        rewards, values, _ = self._score(replies, rows, values, batch["prompt"].device, where)
        return {"prompts": len(rewards)} | {k: v.sum().item() for k, v in values.items()}

    @staticmethod
    def summarize(sums):
        n = sums.get("prompts")
        return {k: v / n for k, v in sums.items() if k != "prompts"} if n else {}


def _keep_groups(rounds: list[dict], B: int, G: int) -> dict:
    """B groups' rows: the informative ones in the order rolled out, then set-aside ones to fill."""
    chosen = [(r, g) for want in (True, False) for r, x in enumerate(rounds)
              for g in np.flatnonzero(x["informative"] == want)][:B]
    return {k: np.concatenate([rounds[r]["rows"][k][g * G:(g + 1) * G] for r, g in chosen])
            for k in rounds[0]["rows"]}


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
        messages, answer = example[0], example[1]["answer"]
        return template.prompt_segments(messages) + ([(f"  answer: {answer}", True, False)] if answer else [])

    def template_problems(self, where, options, template):
        """An environment's tools are called as the model's template writes calls: it must write some."""
        if options.environment is None:
            return []
        try:
            ToolCallFormat.of(template)
        except TokenizerError as e:
            return [f"{where}.environment: {e.message}"]
        return []

    def plan_options(self, spec, recipe):
        return spec.options.model_copy(update={"reward": plan_terms(spec.options.reward, recipe.base_dir)})

    def notes(self, where, options):
        env = options.environment
        found = env and environments.find(env, f"{where}.environment")
        return plugin_notes(where, options.reward) + ([
            f"{where}.environment: {found.label}, tools {', '.join(t['function']['name'] for t in found.env.tools)}; "
            f"up to {env.max_turns} turns of up to {options.max_new_tokens} tokens each"] if env else [])

    def check(self, where, index, o, recipe, sources, fingerprint):
        spec, problems = recipe.stages[index], []
        if not o.reward and o.environment is None:
            problems.append(f"{where}.reward: a grpo stage needs a reward: a verifier ({', '.join(VERIFIERS)}), "
                            "a reward stage, a reward model's final/ folder, a plugin, or an environment's own")
        if o.environment is not None:
            problems += environments.problems(o.environment, f"{where}.environment")
        if o.max_new_tokens >= recipe.stage_seq_len(spec):
            problems.append(f"{where}.max_new_tokens: {o.max_new_tokens} leaves no room for a prompt in "
                            f"seq_len {recipe.stage_seq_len(spec)}")
        if o.max_rollouts != Options.model_fields["max_rollouts"].default and not o.dynamic_sampling:
            problems.append(f"{where}.max_rollouts: applies to dynamic_sampling: true")
        return problems + term_problems(where, index, o.reward, recipe, sources, fingerprint)

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp, tokenizer, template, seed)



KIND = Grpo()
