"""Step anatomy: where llmforge's training time goes, for the quickstart's model.

    python benchmarks/step_anatomy.py [--steps 200]

Runs the real engine (run_stages) on the quickstart's pretraining setup (llama, 4 layers, 128
wide, seq_len 128, 16 sequences per step; metrics every 10 steps, a checkpoint every 50, evals at
the start and end) with timers wrapped around its parts: drawing and moving the batch (data), the
model's forward and loss, backward, clipping + optimizer step (optimizer), metrics lines
(logging), checkpoint gathering and writing, held-out evals, and the stage's one-time setup (model
built, weights initialized) and final save. What is left is the loop itself.
On CPU every op is synchronous, so the timers see the real cost; on a GPU they would not.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from baseline_loop import RECIPE  # noqa: E402  (this folder is on sys.path when run as a script)
from rich.console import Console

import llmforge.run.distributed
import llmforge.run.engine as engine
import llmforge.stages.pretrain as pretrain
from llmforge.output.progress import Reporter
from llmforge.recipe.loader import load_recipe
from llmforge.run.prepare import prepare_run

SECTIONS = ("data", "forward", "backward", "optimizer", "logging", "checkpoint", "eval", "stage setup + final save")
spent: dict = defaultdict(float)
_inside: list = []


@contextlib.contextmanager
def section(name: str):
    """Time spent in `name`; nested sections count toward the outermost (an eval's forwards are eval)."""
    if _inside:
        yield
        return
    _inside.append(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        spent[name] += time.perf_counter() - start
        _inside.pop()


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        with section(name):
            return fn(*args, **kwargs)
    return wrapper


def instrument() -> None:
    engine.Sampler.next_batch = timed("data", engine.Sampler.next_batch)
    engine._to = timed("data", engine._to)
    pretrain.token_losses = timed("forward", pretrain.token_losses)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = timed("optimizer", torch.nn.utils.clip_grad_norm_)
    build = engine.build_optimizer

    def build_timed(*args, **kwargs):
        with section("stage setup + final save"):  # the first optimizer imports torch._dynamo: ~1.6 s
            opt = build(*args, **kwargs)
        opt.step, opt.zero_grad = timed("optimizer", opt.step), timed("optimizer", opt.zero_grad)
        return opt

    engine.build_optimizer = build_timed
    Reporter.log = timed("logging", Reporter.log)
    engine.save_checkpoint = timed("checkpoint", engine.save_checkpoint)
    llmforge.run.distributed.full_state = timed("checkpoint", llmforge.run.distributed.full_state)
    engine.evaluate = timed("eval", engine.evaluate)
    engine._setup = timed("stage setup + final save", engine._setup)
    engine._finish = timed("stage setup + final save", engine._finish)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "recipe.yaml").write_text(RECIPE.format(steps=args.steps, eval_tokens="16Ki", checkpoint_every=50))
        reporter = Reporter(Console(quiet=True), live=False)
        ctx = prepare_run(load_recipe(folder / "recipe.yaml"), folder / "run", reporter)
        instrument()
        start = time.perf_counter()
        try:
            engine.run_stages(ctx)
        finally:
            reporter.close()
        total = time.perf_counter() - start
    spent["loop and the rest"] = total - sum(spent.values())
    sp = ctx.plan.stages[0]
    print(f"{args.steps} steps of {sp.batch_tokens:,} tokens in {total:.2f} s "
          f"({args.steps * sp.batch_tokens / total:,.0f} tokens/s overall)\n")
    print(f"{'part':20} {'seconds':>8} {'ms/step':>8} {'share':>7}")
    for name in (*SECTIONS, "loop and the rest"):
        print(f"{name:20} {spent[name]:>8.2f} {1000 * spent[name] / args.steps:>8.2f} {spent[name] / total:>7.1%}")


if __name__ == "__main__":
    main()
