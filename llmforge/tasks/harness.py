"""llmforge's model as an lm-evaluation-harness `LM`, registered as `llmforge`: any of lm-eval's
tasks (MMLU, ARC, HellaSwag, GSM8K, a local task YAML...) scores a stage's final weights without
an export, on the device the run would use.

lm-eval asks three things of a model: the log-likelihood of a continuation after a context
(multiple choice), the log-likelihood of a whole text in windows of the model's context
(perplexity), and greedy text until a stop string (generation). The first two score each request's
tokens as lm-eval's own Hugging Face backend does (the same windows, the same left truncation), so
an exported model scores the same in both; generation runs batched through one KV cache per batch
(model/generate.py). `run_lm_eval` is what `llmforge eval` and a stage's `eval.tasks` call.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models, registered before ours: a registry with ours
import torch  # alone would look complete to lm-eval, and `--model hf` would be unknown)
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..errors import PlanError
from ..model.generate import generate_batch, reply_texts
from ..text.chat import encode_segments


@register_model("llmforge")
class LlmforgeLM(TemplateLM):
    """`--model llmforge --model_args run=runs/x,stage=sft[,device=cuda,batch_size=16]`; or, from
    llmforge itself, a model already in memory (`model`, `tokenizer`, `template`)."""

    def __init__(self, run: str | None = None, stage: str | None = None, device: str | None = None,
                 batch_size: int | str = 16, max_gen_toks: int = 256, model=None, tokenizer=None, template=None,
                 **_ignored):  # lm-eval passes its own settings too (max_batch_size...)
        super().__init__()
        if model is None:
            model, tokenizer, template = _load_stage(Path(run), stage, device)
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self._device = next(model.parameters()).device
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = model.config.seq_len
        self._chat = False  # lm-eval applied the chat template to the requests' text
        specials = sorted(tokenizer.specials, key=len, reverse=True)
        self._specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    # --- what TemplateLM asks ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "llmforge"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The text's ids, as the model's own tokenizer encodes it. Text the chat template wrote
        holds its tags as text: they become their special tokens again, as in training."""
        if not (self._chat and self._specials):
            return self.tokenizer.encode(string)
        parts = self._specials.split(string)
        segments = [(p, i % 2 == 1, False) for i, p in enumerate(parts) if p]
        return encode_segments(self.tokenizer, segments)[0]

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        self._chat = True
        segments = self.template.prompt_segments(chat_history) if add_generation_prompt \
            else self.template.segments(chat_history)
        return "".join(text for text, _, _ in segments)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template.jinja() if self.template is not None and hasattr(self.template, "jinja") else None

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per
        (key, context ids, continuation ids): the last max_length + 1 ids, the last one only a
        target; longest first, `batch_size` rows at a time, right-padded."""
        out: list = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chunk]
            idx = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
            for r, ids in enumerate(rows):
                idx[r, :len(ids)] = torch.tensor(ids)
            logp = F.log_softmax(self.model(idx.to(self._device)).float(), dim=-1)
            for r, i in enumerate(chunk):
                cont = requests[i][2]
                span = logp[r, len(rows[r]) - len(cont):len(rows[r])]
                target = torch.tensor(cont, device=span.device)
                answer = (float(span.gather(1, target[:, None]).sum()), bool((span.argmax(-1) == target).all()))
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood, in disjoint windows of max_length tokens, each after the
        tokens before it (the first after the prefix token)."""
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [(None,) + lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) text after each context, cut at the first of its
        `until` strings; requests with the same settings run `batch_size` at a time."""
        out: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        stops = tuple(self.template.stop_ids(self.tokenizer)) if self._chat and self.template else (self.eot_token_id,)
        for key, members in groups.items():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            steps = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            generator = torch.Generator(device=self._device).manual_seed(1234) if temperature else None
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                ids = [self.tok_encode(requests[i].args[0])[-max(1, self.max_length - steps):] for i in chunk]
                n = min(steps, self.max_length - max(map(len, ids)))
                prompts = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
                for r, x in enumerate(ids):
                    prompts[r, :len(x)] = torch.tensor(x)
                got = generate_batch(self.model, prompts.to(self._device), torch.tensor([len(x) for x in ids],
                                     device=self._device), max(n, 1), temperature=temperature, top_k=None,
                                     generator=generator, stop_ids=stops, vocab_limit=self.tokenizer.vocab_size)
                for i, text in zip(chunk, reply_texts(self.tokenizer, got, stops)):
                    for term in until:
                        text = text.split(term)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def _load_stage(run: Path, stage: str | None, device: str | None):
    """A run's stage (the last finished one by default), its tokenizer and chat template, on
    `device`: lm-eval's command line passes cuda unless told, so on a machine without CUDA, the CPU."""
    from ..store.final import final_template, find_stage, load_trained

    final = find_stage(run, stage)
    cuda = torch.cuda.is_available()
    where = device if device and (cuda or not device.startswith("cuda")) else "cuda" if cuda else "cpu"
    model, tokenizer = load_trained(final, where)
    return model, tokenizer, final_template(final)


def run_lm_eval(model, tokenizer, template, tasks: list[str], *, limit: int | None = None,
                apply_chat_template: bool = False, include_path: str | None = None,
                num_fewshot: int | None = None, batch_size: int = 16) -> dict:
    """lm-eval's tasks on a model in memory: {"lm-eval/<task>/<metric>": value} (a metric under
    a filter other than lm-eval's "none" is named metric:filter)."""
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes on default aggregations
    # lm-eval records the git commit of the folder it runs in, asking git, whose "fatal: not a git
    # repository" would reach the user's terminal from a run folder; the commit of a run's folder
    # says nothing about the model anyway.
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    manager = TaskManager(include_path=include_path, verbosity="ERROR")
    if unknown := [t for t in tasks if t not in manager.all_tasks]:
        raise PlanError(f"eval.tasks: lm-eval has no task {unknown[0]!r}"
                        + (f" (nor does {include_path})" if include_path else ""),
                        hint="`lm-eval ls tasks` lists lm-eval's; a task of your own is a YAML file in the folder "
                             "eval.lm_eval.include_path (or --include-path) names")
    if apply_chat_template and template is None:
        raise PlanError("eval.lm_eval.apply_chat_template: the stage was trained without a chat template",
                        hint="leave it out, or train with tokenizer.chat_template")
    lm = LlmforgeLM(model=model, tokenizer=tokenizer, template=template, batch_size=batch_size)
    with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars, per task and phase: ours show
        results = lm_eval.evaluator.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                                    apply_chat_template=apply_chat_template, verbosity="ERROR",
                                                    task_manager=manager)
    out = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for name, value in metrics.items():
            metric, _, filt = name.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or metric in ("alias", "sample_len"):
                continue
            out[f"lm-eval/{task}/{metric if filt in ('none', '') else f'{metric}:{filt}'}"] = float(value)
    return out
