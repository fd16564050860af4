"""grpo step anatomy, and batched KV-cached generation against a naive loop without a cache.

    python benchmarks/grpo_anatomy.py [--run runs/quickstart-rlhf] [--steps 5]

Needs a finished run of recipes/quickstart-rlhf.yaml (its sft policy, its reward model, its
tokenizer and world-questions data). Each of `--steps` grpo steps of that recipe (8 questions x
8 replies, up to 24 new tokens) is taken apart with the stage's own objective:
  generation   one batched, KV-cached sampling of all 64 replies;
  scoring      decoding + the exact verifier + the reward model;
  reference    the frozen reference's log-probs of the replies;
  update       forward + backward over the replies, and the AdamW step.
Then the same 64 replies' generation, greedy, with the cache and with a loop that runs the whole
sequence through the model for every new token (what generation without a cache costs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from llmforge.data.cache import prepare_source
from llmforge.data.sampler import Sampler
from llmforge.model.generate import generate_batch
from llmforge.optim import build_optimizer
from llmforge.plan.devices import detect_device
from llmforge.plan.plan import plan_stage
from llmforge.run.engine import stage_rows
from llmforge.run.evaluation import load_run_recipe
from llmforge.run.prepare import recipe_template, source_stats
from llmforge.stages import KINDS
from llmforge.stages.kind import to_device
from llmforge.store.final import find_stage, load_model
from llmforge.text.tokenizer_json import load_tokenizer


def naive_generate(model, prompts: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy, every step a forward over the whole (left-padded) sequence: no cache."""
    B, P = len(prompts), int(lengths.max())
    pad = P - lengths
    cols = torch.arange(P)
    idx = prompts.gather(1, (cols - pad[:, None]).clamp(min=0))
    docs = (cols >= pad[:, None]).long()
    for _ in range(max_new_tokens):
        token = model(idx, docs=docs)[:, -1].argmax(-1)
        idx = torch.cat([idx, token[:, None]], dim=1)
        docs = torch.cat([docs, torch.ones(B, 1, dtype=torch.long)], dim=1)
    return idx[:, P:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/quickstart-rlhf")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    run = Path(args.run)
    recipe = load_run_recipe(run)
    index = next(i for i, s in enumerate(recipe.stages) if s.kind == "grpo")
    spec = recipe.stages[index]
    tokenizer, template = load_tokenizer(run / "tokenizer"), recipe_template(recipe)
    device = detect_device(recipe.runtime)
    torch.set_num_threads(device.threads)
    sources = {n: prepare_source(n, recipe.data[n], recipe.base_dir, tokenizer, template=template) for n in spec.mix}
    sp = plan_stage(recipe, index, vocab_size=tokenizer.vocab_size, device=device,
                    sources={n: source_stats(s) for n, s in sources.items()}, tokenizer_fingerprint=tokenizer.fingerprint)
    kind, start = KINDS["grpo"], find_stage(run, spec.init)
    model = load_model(start, kind.build_model)
    objective = kind.objective(sp, tokenizer, template, recipe.seed)
    stage = run / "stages" / sp.dir_name
    stage.mkdir(parents=True, exist_ok=True)
    objective.start(model, stage, torch.device("cpu"))
    train, _ = stage_rows(sources, sp, recipe.seed)
    sampler = Sampler([(train[s.name], s.weight) for s in sp.mix], sp.global_batch, recipe.seed, sp.index)
    opt = sp.optimizer
    optimizer = build_optimizer(model, opt | {"lr": sp.lr})
    o, cpu = sp.options, torch.device("cpu")
    times: dict = {k: [] for k in ("generation", "scoring", "reference", "update")}
    for step in range(args.steps):
        batch = sampler.next_batch()
        prompts = {k: v.repeat(o.group, axis=0) for k, v in batch.items()}
        t0 = time.perf_counter()
        model.eval()
        generator = torch.Generator().manual_seed(step)
        rows, replies, _ = objective._generate(model, prompts, cpu, o.temperature, generator, (step, 0, 0))
        t1 = time.perf_counter()  # (generation includes decoding the replies to text)
        rewards, _, _ = objective._score(replies, rows, cpu, (step, 0, 0))
        t2 = time.perf_counter()
        rows["ref"] = objective._logps(objective.reference, rows)
        t3 = time.perf_counter()
        rows["advantage"] = (rewards - rewards.mean()).numpy()
        model.train()
        units = len(rows["tokens"])
        for idx in range(0, units, sp.micro_batch * o.group):
            micro = to_device({k: v[idx:idx + sp.micro_batch * o.group] for k, v in rows.items()}, cpu)
            (objective.loss(model, micro)["loss"] / units).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for k, a, b in (("generation", t0, t1), ("scoring", t1, t2), ("reference", t2, t3), ("update", t3, t4)):
            times[k].append(b - a)
    total = sum(statistics.median(v) for v in times.values())
    print(f"grpo step anatomy ({args.steps} steps of {sp.global_batch} prompts x {o.group} replies, "
          f"<= {o.max_new_tokens} new tokens; medians):")
    for k, v in times.items():
        print(f"  {k:<11} {statistics.median(v):7.3f} s  {statistics.median(v) / total:6.1%}")
    print(f"  {'step':<11} {total:7.3f} s")

    model.eval()
    batch = sampler.next_batch()
    prompts = {k: torch.from_numpy(v.repeat(o.group, axis=0)) for k, v in batch.items() if v.dtype != object}
    new = len(prompts["prompt"]) * o.max_new_tokens
    with torch.no_grad():
        cached, naive = [], []
        for _ in range(3):
            t = time.perf_counter()
            out = generate_batch(model, prompts["prompt"], prompts["prompt_len"], o.max_new_tokens, temperature=0,
                                 top_k=None, generator=None, stop_ids=(), vocab_limit=tokenizer.vocab_size)
            cached.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain = naive_generate(model, prompts["prompt"], prompts["prompt_len"], o.max_new_tokens)
            naive.append(time.perf_counter() - t)
        same = torch.equal(out["new"], plain)
    c, n = statistics.median(cached), statistics.median(naive)
    print(f"generation of {len(prompts['prompt'])} x {o.max_new_tokens} tokens (greedy, no early stop; median of 3):")
    print(f"  KV cache, batched   {c:.3f} s  {new / c:9,.0f} tok/s")
    print(f"  no cache, batched   {n:.3f} s  {new / n:9,.0f} tok/s   ({n / c:.1f}x slower)")
    print(f"  the same replies: {'yes' if same else 'no (float rounding broke a tie)'}")


if __name__ == "__main__":
    main()
