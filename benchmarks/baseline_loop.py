"""Engine overhead: llmforge's training throughput against a bare PyTorch loop, in one process,
alternating step by step.

    python benchmarks/baseline_loop.py [--steps 150] [--rounds 3]

Both train the quickstart's model (llama, 4 layers, 128 wide, seq_len 128) with 16 sequences per
step, AdamW (the same settings, fused) and grad clipping. The bare loop has no data pipeline
(one batch of the same training tokens, made once), no logging, no checkpoints, no schedule. llmforge runs its
whole engine on the generated world's facts: sampler, schedule, the loss over the mixed batch,
metrics every 10 steps. One bare-loop step runs before each llmforge step, timed on its own, so
both meet the machine in the same state. llmforge's tokens/s is its time between its first and
last metrics lines (after 10 warm-up steps, before the final eval and save) less the bare steps
taken in between; the loop's is those steps' own time. Target on CPU: llmforge >= 0.97x the loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

import llmforge.run.engine as engine
from llmforge.model.transformer import ModelConfig, Transformer
from llmforge.output.progress import Reporter
from llmforge.recipe.loader import load_recipe
from llmforge.run.engine import run_stages
from llmforge.run.prepare import prepare_run

RECIPE = """\
name: overhead
tokenizer: {{type: bpe, vocab_size: 1536}}
model: {{preset: llama, n_layer: 4, n_head: 4, n_embd: 128, seq_len: 128, tie_embeddings: true}}
data:
  facts: {{builtin: world-facts, val_fraction: 2%}}
stages:
  - name: pretrain
    kind: pretrain
    mix: {{facts: 1.0}}
    steps: {steps}
    batch_size: 16
    optimizer: {{lr: 3e-3, weight_decay: 0.1}}
    eval: {{tokens: {eval_tokens}}}
    checkpoint: {{every: {checkpoint_every}, keep: 2}}
runtime: {{log_every: 10}}
"""  # the quickstart's pretraining setup (benchmarks/step_anatomy.py uses it too)
WARMUP = 10


class BareLoop:
    """The hand-written loop: the same model class and optimizer, one fixed batch, nothing else."""

    def __init__(self, cfg: ModelConfig, ids: torch.Tensor):
        torch.manual_seed(0)
        self.model = Transformer(cfg)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                     lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
        self.x, self.y = ids[:, :-1], ids[:, 1:]

    def step(self) -> float:
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(self.model(self.x).flatten(0, 1), self.y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def one_round(folder: Path) -> tuple[float, float]:
    """One llmforge run with a bare-loop step before each of its steps: both see the same
    moments of the machine (on a shared VM its speed drifts by 10% from minute to minute)."""
    spec = load_recipe(folder / "recipe.yaml")
    reporter = Reporter(Console(quiet=True), live=False)
    ctx = prepare_run(spec, folder / "run", reporter, restart=True)
    # The loop's batch: 16 windows of the same training tokens (not uniform random ids: real
    # text's skewed ids make the embedding and loss ~10% faster, measured).
    seq = ctx.plan.model.seq_len + 1
    bare = BareLoop(ctx.plan.model, torch.from_numpy(ctx.sources["facts"].train[:16 * seq].astype("int64")).view(16, seq))
    bare_times, train_step = [], engine.train_step

    def with_bare_step(*args, **kwargs):
        bare_times.append((time.time(), bare.step()))
        return train_step(*args, **kwargs)

    engine.train_step = with_bare_step
    try:
        run_stages(ctx)
    finally:
        engine.train_step, _ = train_step, reporter.close()
    logs = [r for r in map(json.loads, (folder / "run/stages/01-pretrain/metrics.jsonl").read_text().splitlines())
            if "loss" in r]
    first, last = logs[0], logs[-1]  # first: after WARMUP steps
    inside = [dt for t, dt in bare_times if first["time"] < t < last["time"]]
    steps = last["step"] - first["step"]
    ours = steps * ctx.plan.stages[0].batch_tokens / (last["time"] - first["time"] - sum(inside))
    theirs = len(inside) * 16 * ctx.plan.model.seq_len / sum(inside)
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per run (multiple of 10)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "recipe.yaml").write_text(RECIPE.format(steps=args.steps + WARMUP, eval_tokens="2Ki", checkpoint_every=0))
        for i in range(args.rounds):
            a, b = one_round(folder)
            ours.append(a)
            theirs.append(b)
            print(f"round {i + 1}: llmforge {a:,.0f} tok/s, bare loop {b:,.0f} tok/s, ratio {a / b:.3f}", flush=True)
    ratios = [a / b for a, b in zip(ours, theirs)]
    print(f"\n{'':12} {'tokens/s (median)':>18}")
    print(f"{'llmforge':12} {statistics.median(ours):>18,.0f}")
    print(f"{'bare loop':12} {statistics.median(theirs):>18,.0f}")
    print(f"{'ratio':12} {statistics.median(ratios):>18.3f}   (per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"target >= 0.97)")


if __name__ == "__main__":
    main()
