"""GRPO on a real model beside TRL: SmolLM2-135M-Instruct on arithmetic word problems.

    python benchmarks/grpo_real.py [--steps 16] [--batch 4] [--group 4] [--max-new 64] [--seeds 0 1 2]

The model folder is the one benchmarks/real_model.py builds from a PyPI wheel (no hub download).
The script writes word problems with their answers (a train set and a held-out set) and trains,
for each seed, side by side in one process tree:

1. llmforge: a grpo stage (`llmforge run`), rewards `math` + 0.2 x `format`;
2. TRL's GRPOTrainer with the same model, prompts (through the same chat template), group size,
   reply length, learning rate, schedule (linear, no warmup), AdamW settings, KL weight, clip,
   loss (`grpo`: per-reply token mean) and steps, rewarded by a function doing the same checks
   (llmforge's math verifier, and whether the reply ended before max_new_tokens);
3. llmforge again with the built-in `calculator` environment (seed 0 only): SmolLM2's own template
   writes no tool calls, so the model folder is copied with a ChatML template that does (Qwen2.5's
   <tool_call> tags, the same special tokens), and a short sft stage on calculator conversations
   comes first (the model was never taught to call a tool: without it, it calls none).

It prints seconds per step (median over the steps after the first), generation's share of a step,
the reward curve of each, and held-out accuracy (greedy, transformers generate on every exported
model alike) before and after. Figures go to $OUT or benchmarks/out/grpo_real.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from real_model import CACHE, build_folder  # noqa: E402

from llmforge.stages.verifiers import verify  # noqa: E402

ASK = " Give the final answer as a number in \\boxed{}."
TOOL_TEMPLATE = (REPO / "benchmarks/chatml_tools.jinja")


def problems(n: int, seed: int) -> list[dict]:
    """One-step word problems with small whole-number answers (a 135M model solves some, so the
    groups' rewards differ and there is something to learn)."""
    rng, names, things = random.Random(seed), ["Mia", "Omar", "Lena", "Ravi", "Sofia"], ["apples", "pens", "stamps"]
    out = []
    for _ in range(n):
        who, what, a, b = rng.choice(names), rng.choice(things), rng.randint(2, 20), rng.randint(2, 9)
        if rng.random() < 0.5:
            text, value = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?", a + b
        else:
            text, value = f"{who} has {a + b} {what} and gives {b} away. How many {what} are left?", a
        out.append({"prompt": text + ASK, "answer": str(value)})
    return out


def write_data(work: Path, train: int, held_out: int) -> list[dict]:
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in problems(train, 1)))
    test = problems(held_out, 2)
    (work / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return test


def accuracy(folder: Path, test: list[dict], max_new: int) -> tuple[float, list[str]]:
    """Greedy replies of the transformers model in `folder`, checked by llmforge's math verifier."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    replies = []
    for i in range(0, len(test), 16):
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                         add_generation_prompt=True) for r in test[i:i + 16]]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id
                                 or tok.eos_token_id)
        replies += tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    right = [verify("math", r, p["answer"], True, 0, max_new_tokens=max_new, within=max_new)
             for r, p in zip(replies, test)]
    return sum(right) / len(right), replies


RECIPE = {"name": "grpo", "seed": 0, "model": {"init": {"hf": ""}},
          "data": {"train": {"path": "train.jsonl", "format": "prompt", "val_fraction": 0.05}},
          "stages": [{"name": "grpo", "kind": "grpo", "mix": {"train": 1.0}, "seq_len": 256,
                      "reward": [{"verifier": "math"}, {"verifier": "format", "weight": 0.2}],
                      "optimizer": {"lr": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                                    "grad_clip": 1.0},
                      "schedule": {"warmup": 0, "decay": "linear", "min_lr": 0},
                      "eval": {"every": 0}, "checkpoint": {"every": 0}, "kl": 0.04, "clip": 0.2,
                      "temperature": 1.0}],
          "runtime": {"log_every": 1, "compile": False}}


def tool_conversations(work: Path, n: int = 160) -> None:
    """sft data for the calculator run: the problem, a calculator call, its result, the boxed answer
    (SmolLM2 was never taught to call tools: without this it does not)."""
    from llmforge.stages.environments import Calculator

    with open(work / "calls.jsonl", "w") as f:
        for r in problems(n, 3):
            a, b = (int(x) for x in re.findall(r"\d+", r["prompt"])[:2])
            expression = f"{a} + {b}" if "gets" in r["prompt"] else f"{a} - {b}"
            call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
            f.write(json.dumps({"tools": Calculator.tools, "messages": [
                {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "calculator", "content": r["answer"]},
                {"role": "assistant", "content": f"The answer is \\boxed{{{r['answer']}}}."}]}) + "\n")


def run_llmforge(folder: Path, work: Path, a, seed: int, environment: dict | None = None) -> dict:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["seed"], recipe["model"]["init"]["hf"] = seed, str(folder)
    if environment:  # a short sft on calculator conversations first: the model learns to call it at all
        tool_conversations(work)
        recipe["data"]["calls"] = {"path": "calls.jsonl", "format": "chat", "val_fraction": 0}
        recipe["stages"].insert(0, {"name": "sft", "kind": "sft", "mix": {"calls": 1.0}, "steps": 20,
                                    "batch_size": 8, "optimizer": {"lr": 5e-5, "weight_decay": 0.0},
                                    "eval": {"every": 0}, "checkpoint": {"every": 0}})
    stage = recipe["stages"][-1]
    stage.update(steps=a.steps, batch_size=a.batch, group=a.group, max_new_tokens=a.max_new)
    stage["optimizer"]["lr"] = a.lr
    if environment:  # and its greedy conversations with the tool on held-out prompts, first and last step
        stage.update(environment=environment, seq_len=768, eval={"every": a.steps, "tokens": 1 << 20})
    name = f"llmforge-{seed}" + ("-tools" if environment else "")
    (work / f"{name}.yaml").write_text(yaml.safe_dump(recipe | {"name": name}, sort_keys=False))
    subprocess.run([sys.executable, "-m", "llmforge", "run", f"{name}.yaml", "-q"], cwd=work, check=True)
    grpo = sorted((work / f"runs/{name}/stages").glob("*-grpo"))[0]
    metrics = [json.loads(x) for x in (grpo / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    exported = work / f"{name}-hf"
    shutil.rmtree(exported, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "llmforge", "export", f"runs/{name}", "--stage", "grpo", "--out", str(exported)], cwd=work,
                   check=True, capture_output=True)
    total = [m["rollout_s"] + m["update_s"] for m in steps]
    out = {"s_per_step": statistics.median(total[1:] or total),
           "generation_share": statistics.median(m["generate_s"] / t for m, t in zip(steps[1:] or steps, total[1:] or total)),
           "reward": [m["reward"] for m in steps], "folder": str(exported)}
    if environment:
        evals = [m for m in metrics if "val_reward" in m]
        out |= {"tool_calls": statistics.mean(m["tool_calls"] for m in steps),
                "tool_errors": statistics.mean(m["tool_errors"] for m in steps),
                "val_math_before": evals[0]["val_reward/math"], "val_math_after": evals[-1]["val_reward/math"],
                "val_tool_calls_before": evals[0]["val_tool_calls"], "val_tool_calls_after": evals[-1]["val_tool_calls"]}
    return out


def run_trl(folder: Path, work: Path, a, seed: int) -> dict:
    """TRL's GRPOTrainer on the same settings; times each step and the generation inside it."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(x) for x in (work / "train.jsonl").read_text().splitlines()]
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                       for r in rows])

    def math_reward(prompts, completions, answer, **kw):
        return [verify("math", c[0]["content"], x, True, 0, max_new_tokens=a.max_new, within=a.max_new)
                for c, x in zip(completions, answer)]

    def format_reward(prompts, completions, completion_ids, **kw):
        return [float(len(ids) < a.max_new) for ids in completion_ids]  # ended before max_new_tokens

    config = GRPOConfig(output_dir=str(work / f"trl-{seed}"), per_device_train_batch_size=a.batch * a.group,
                        gradient_accumulation_steps=1, num_generations=a.group, max_completion_length=a.max_new,
                        learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=0.04,
                        epsilon=0.2, loss_type="grpo", scale_rewards="group", temperature=1.0, top_k=0,
                        max_steps=a.steps, logging_steps=1, seed=seed, report_to="none", save_strategy="no",
                        use_cpu=True, bf16=False, reward_weights=[1.0, 0.2], disable_dropout=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[math_reward, format_reward], args=config, train_dataset=data,
                          processing_class=tok)
    spent = {"generation": 0.0}
    generate = trainer._generate

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            spent["generation"] += time.perf_counter() - t
    trainer._generate = timed
    times, shares = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t, spent["generation"] = time.perf_counter(), 0.0

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t)
            shares.append(spent["generation"] / times[-1])
    trainer.add_callback(Clock())
    trainer.train()
    saved = work / f"trl-{seed}-hf"
    trainer.save_model(str(saved))
    tok.save_pretrained(str(saved))
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"s_per_step": statistics.median(times[1:] or times), "generation_share": statistics.median(shares[1:] or shares),
            "reward": rewards, "folder": str(saved)}


def plain_folder(folder: Path, work: Path) -> Path:
    """The folder without the GGUF quantization note in its config.json: its weights are the
    dequantized fp32 ones, but transformers' Trainer refuses to fine-tune a model marked quantized."""
    out = work / "smollm2"
    if not out.exists():
        out.mkdir()
        for f in folder.iterdir():
            if f.name != "config.json":
                (out / f.name).symlink_to(f)
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def tool_folder(folder: Path, work: Path) -> Path:
    """The model folder with a ChatML template that writes tool calls (SmolLM2's own has no tools)."""
    out = work / "smollm2-tools"
    if not out.exists():
        out.mkdir()
        for f in folder.iterdir():
            if f.name not in ("chat_template.jinja", "tokenizer_config.json"):
                (out / f.name).symlink_to(f)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)  # the template is chat_template.jinja, as in the folder it copies
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        shutil.copy(TOOL_TEMPLATE, out / "chat_template.jinja")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="replies per prompt")
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--held-out", type=int, default=48)
    p.add_argument("--no-tools", action="store_true")
    p.add_argument("--tools-only", action="store_true", help="only the calculator run")
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(os.environ.get("OUT", REPO / "benchmarks/out")) / "grpo_real"
    work.mkdir(parents=True, exist_ok=True)
    folder = plain_folder(build_folder(CACHE / "smollm2-135m-instruct"), work)
    test = write_data(work, 400, a.held_out)
    before, sample = accuracy(folder, test, a.max_new)
    print(f"held-out accuracy before grpo: {before:.3f}  (e.g. {sample[0]!r})", flush=True)
    results = {"settings": vars(a), "before": before, "runs": {}}
    for seed in a.seeds if not a.tools_only else []:
        for tool, run in (("llmforge", run_llmforge), ("trl", run_trl)):
            got = run(folder, work, a, seed)
            got["accuracy"] = accuracy(Path(got["folder"]), test, a.max_new)[0]
            results["runs"][f"{tool}-{seed}"] = got
            print(f"{tool} seed {seed}: {got['s_per_step']:.2f} s/step ({got['generation_share']:.0%} generating), "
                  f"reward {' '.join(f'{r:.2f}' for r in got['reward'])}, held-out {got['accuracy']:.3f}", flush=True)
    if not a.no_tools:
        got = run_llmforge(tool_folder(folder, work), work, a, a.seeds[0], {"name": "calculator", "max_turns": 3})
        results["runs"]["llmforge-tools"] = got
        print(f"llmforge + calculator: {got['s_per_step']:.2f} s/step, tool calls {got['tool_calls']:.2f} a conversation "
              f"(errors {got['tool_errors']:.2f}), reward {' '.join(f'{r:.2f}' for r in got['reward'])}; held-out "
              f"(its val split, greedy, with the tool) math {got['val_math_before']:.3f} -> {got['val_math_after']:.3f}, "
              f"tool calls {got['val_tool_calls_before']:.2f} -> {got['val_tool_calls_after']:.2f}", flush=True)
    for tool in ("llmforge", "trl") if not a.tools_only else ():
        runs = [results["runs"][f"{tool}-{s}"] for s in a.seeds]
        print(f"{tool:9s} s/step {statistics.median(r['s_per_step'] for r in runs):6.2f}  "
              f"held-out {statistics.mean(r['accuracy'] for r in runs):.3f} "
              f"(min {min(r['accuracy'] for r in runs):.3f}, max {max(r['accuracy'] for r in runs):.3f})  "
              f"last-3 reward {statistics.mean(statistics.mean(r['reward'][-3:]) for r in runs):.3f}")
    (work / "grpo_real.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
