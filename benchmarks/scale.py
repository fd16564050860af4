"""Packed sft of a model with Qwen2.5-0.5B's real shape on this CPU: llmforge before and after
the scale work, and transformers + TRL's SFTTrainer, side by side.

    python benchmarks/scale.py [--rows all|NAME,...] [--steps 4] [--repeat 1] [--before REV] [--out scale.json]

The model is Qwen2.5-0.5B's shape (24 layers, 896 wide, 14 heads, 2 KV heads, SwiGLU 4864,
vocab 151,936, tied embeddings, q/k/v biases) with random weights, built by transformers from a
config and saved once under $LLMFORGE_CACHE/models/qwen25-05b-shape, with a small byte-level BPE
tokenizer and a ChatML template (nothing is downloaded; the 151,936-row head is what costs, not
the tokenizer). The conversations are written here: 100 to 1,500 tokens each, so packed rows of
2,048 and 4,096 tokens hold several. Every token is learned (train_on: all), as TRL's default.

Each row of the table is --steps training steps in their own process (fp32): llmforge through its CLI
(`llmforge run`, an explicit runtime.micro_batch so the plan never refuses a row), the `before`
tree (a git worktree of REV, default the commit before the scale work) the same way, TRL's
SFTTrainer with packing (its padding-free "bfd" packing, position_ids marking the documents) and
gradient_checkpointing on or off. The parent samples the child's resident memory every 20 ms
until the last step ends: peak (the highest of a row's runs), and peak minus the model's own
state (weights, gradients and AdamW's two moments: 16 bytes a parameter). tokens/s counts the
tokens really in the rows (llmforge's own count; TRL's num_input_tokens_seen, non-padding), one
figure a step from the second on (the first holds warm-up); a row shows the median of all its
steps, and `vs TRL` the ratio of medians to TRL's row at the same length, micro-batch and
checkpointing. --repeat R runs the chosen rows R times in turn (a, b, a, b, ...), so a drift of
this machine's speed hits both tools alike. The CPU's fp32 matmul peak (a 4096^3 torch.mm, best
of 5) turns each row's model FLOP/s (6N + attention per token, the same formula for all) into a
share of what this CPU can do.

A row's results are added to --out as they come, so a long run can be resumed or split
(--rows NAME,... runs those alone; a row run again adds its steps); the table is printed from
the file at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLMFORGE_CACHE", "~/.cache/llmforge")).expanduser()
FOLDER = CACHE / "models" / "qwen25-05b-shape"
BEFORE = "a11498a"  # main before issue 28's attention, loss, checkpointing and trimming
SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
             max_position_embeddings=32768, rms_norm_eps=1e-6)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = [a + b for a in ("ka", "lo", "mi", "ne", "ta", "ri", "su", "vo", "el", "an") for b in ("", "n", "s", "ra", "to")]
# name -> (tool, seq_len, micro-batch, activation checkpointing)
ROWS = {f"{tool}-{ac}-{T}x{m}": (tool, T, m, ac)
        for T, m in ((2048, 1), (4096, 1), (4096, 2))
        for tool, ac in (("before", "none"), ("after", "none"), ("after", "full"), ("trl", "none"), ("trl", "full"))}


def row(name: str) -> tuple[str, int, int, str]:
    """(tool, seq_len, micro-batch, checkpointing) of a row named as ROWS names them; a row beyond
    them (a larger micro-batch, to find the largest that fits: after-full-4096x8) is read the same way."""
    tool, ac, shape = name.split("-")
    T, micro = shape.split("x")
    if tool not in ("before", "after", "trl") or ac not in ("none", "full") or int(T) not in (2048, 4096):
        raise SystemExit(f"{name}: a row is TOOL-CHECKPOINTING-SEQxMICRO, TOOL before/after/trl, CHECKPOINTING "
                         f"none/full, SEQ 2048 or 4096")
    return tool, int(T), int(micro), ac


def build_folder() -> Path:
    if (FOLDER / "model.safetensors").is_file():
        return FOLDER
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    FOLDER.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    text = [" ".join(random.Random(i).choices(WORDS, k=200)) for i in range(200)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(FOLDER / "tokenizer.json"))
    (FOLDER / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "model_max_length": 32768}))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**SHAPE))
    model.save_pretrained(FOLDER)
    return FOLDER


def write_chat(folder: Path, n: int = 400) -> Path:
    rng = random.Random(0)
    path = folder / "chat.jsonl"
    with open(path, "w") as f:
        for _ in range(n):
            words = rng.randint(60, 1000)  # ~1.5 tokens a word
            q = " ".join(rng.choices(WORDS, k=max(5, words // 8)))
            a = " ".join(rng.choices(WORDS, k=words))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")
    return path


RECIPE = """\
name: scale
model: {{init: {{hf: {folder}}}}}
data:
  chat: {{path: chat.jsonl, format: chat, val_fraction: 1%}}
stages:
  - name: sft
    kind: sft
    mix: {{chat: 1.0}}
    steps: {steps}
    batch_size: {micro}
    seq_len: {seq_len}
    train_on: all
    optimizer: {{lr: 1e-5, weight_decay: 0.0}}
    schedule: {{warmup: 0}}
    eval: {{every: 0, tokens: {seq_len}}}
runtime: {{micro_batch: {micro}, log_every: 1, threads: 2{extra}}}
"""


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def watch(cmd: list[str], cwd: Path, env: dict, done) -> tuple[int, int, str]:
    """Run cmd, sampling its resident memory until done() says the training step is over:
    (peak bytes, exit code, output tail)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, out = 0, tempfile.TemporaryFile("w+")
    import threading

    threading.Thread(target=lambda: [out.write(line) for line in proc.stdout], daemon=True).start()
    while proc.poll() is None:
        if not done():
            peak = max(peak, rss(proc.pid))
        time.sleep(0.02)
    time.sleep(0.2)
    out.seek(0)
    return peak, proc.returncode, out.read()[-3000:]


def run_llmforge(name: str, tree: Path, T: int, micro: int, ac: str, work: Path, n_steps: int) -> dict:
    run = work / name
    extra = "" if tree != REPO or ac is None else f", activation_checkpointing: {ac}"
    (work / "recipe.yaml").write_text(RECIPE.format(folder=build_folder(), micro=micro, seq_len=T, extra=extra,
                                                    steps=n_steps))
    metrics = run / "stages/01-sft/metrics.jsonl"

    def steps():
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return [json.loads(line) for line in lines if '"loss"' in line]

    def done():
        return len(steps()) == n_steps

    env = dict(os.environ, PYTHONPATH=str(tree))
    peak, code, tail = watch([sys.executable, "-m", "llmforge", "run", "recipe.yaml", "--run-dir", str(run)],
                             work, env, done)
    if code != 0 or not done():
        return {"error": tail, "code": code, "peak": peak}
    later = steps()[1:]
    plan = json.loads((run / "plan.json").read_text())["stages"][0]
    shutil.rmtree(run)  # its final weights: 2 GB a row
    return {"peak": peak, "tokens_per_s": [s["tokens_per_s"] for s in later], "estimate": plan["est_peak_memory_bytes"],
            "micro": plan["micro_batch"], "loss": later[0]["loss"]}


TRL_CHILD = """
import json, sys, time, torch, transformers
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
folder, chat, T, micro, gc, out, steps = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                         sys.argv[5] == "full", sys.argv[6], int(sys.argv[7]))
torch.set_num_threads(2)
rows = [json.loads(l) for l in open(chat)]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
tok = transformers.AutoTokenizer.from_pretrained(folder)
times = {"tokens_per_s": []}
class Clock(transformers.TrainerCallback):
    def on_step_begin(self, args, state, *a, **k):
        times["begin"], times["seen"] = time.perf_counter(), state.num_input_tokens_seen
    def on_step_end(self, args, state, *a, **k):
        rate = (state.num_input_tokens_seen - times["seen"]) / (time.perf_counter() - times["begin"])
        if state.global_step > 1:
            times["tokens_per_s"].append(rate)
        if state.global_step == steps:
            open(out, "w").write(json.dumps(times))
args = SFTConfig(output_dir=out + ".d", max_length=T, packing=True, per_device_train_batch_size=micro,
                 gradient_accumulation_steps=1, max_steps=steps, gradient_checkpointing=gc, use_cpu=True, bf16=False,
                 include_num_input_tokens_seen="non_padding",
                 report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-5, dataloader_num_workers=0)
SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
           callbacks=[Clock()]).train()
"""


def run_trl(name: str, T: int, micro: int, ac: str, work: Path, chat: Path, n_steps: int) -> dict:
    ensure_trl()
    out = work / f"{name}.json"
    out.unlink(missing_ok=True)
    peak, code, tail = watch([sys.executable, "-c", TRL_CHILD, str(build_folder()), str(chat), str(T), str(micro),
                              ac, str(out), str(n_steps)], work, dict(os.environ), out.exists)
    if not out.exists():
        return {"error": tail, "code": code, "peak": peak}
    return {"peak": peak, "tokens_per_s": json.loads(out.read_text())["tokens_per_s"]}


def ensure_trl() -> None:
    import importlib.util

    if importlib.util.find_spec("trl") is None:  # once; its deps beside the transformers already here
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "trl==1.16.0"], check=True)


def matmul_peak() -> float:
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 ** 3 / best


def model_figures() -> tuple:
    """(parameters, training FLOPs per token at seq 2048 and 4096, the plan's memory estimate as
    this checkout computes it) from llmforge's config of the folder."""
    sys.path.insert(0, str(REPO))
    from llmforge.model.hf import hf_config
    from llmforge.plan.estimates import estimate_memory

    cfg = hf_config(build_folder())

    def estimate(T, micro, ac):  # packed rows of `train_on: all`: every position's logits
        return estimate_memory(cfg, micro, T, "fp32", cpu=True, checkpointing=ac)
    return cfg.num_params(), {T: cfg.flops_per_token(T) for T in (2048, 4096)}, estimate


def median(xs: list) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def merge(old: dict | None, new: dict) -> dict:
    """A row run again: its steps join the earlier runs' (the peak is the highest)."""
    if old is None or "error" in old:
        return new | {"runs": 1} if "error" not in new else new
    if "error" in new:
        return old | {"failed_runs": old.get("failed_runs", 0) + 1}
    return new | {"runs": old.get("runs", 1) + 1, "peak": max(old["peak"], new["peak"]),
                  "tokens_per_s": old["tokens_per_s"] + new["tokens_per_s"]}


def table(results: dict, peak_flops: float) -> str:
    params, flops, estimate = model_figures()
    state = 16 * params
    lines = [f"model: {params / 1e6:.0f}M parameters, own state (weights, grads, AdamW) {state / 2**30:.2f} GiB; "
             f"this CPU's fp32 matmul peak {peak_flops / 1e9:.0f} GFLOP/s",
             "| row | runs x steps | peak GiB | beyond state GiB | plan est. GiB (est/peak) | tokens/s median "
             "(min-max) | vs TRL | FLOP/s share |",
             "|---|---|---|---|---|---|---|---|"]
    for name in list(ROWS) + sorted(set(results) - set(ROWS) - {"_matmul_peak"}):
        r = results.get(name)
        if r is None:
            continue
        if "error" in r and r.get("code") == -9:  # SIGKILL: the kernel's out-of-memory killer, here
            lines.append(f"| {name} || killed (out of memory) at {r['peak'] / 2**30:.1f} ||||||")
            continue
        if "error" in r:
            lines.append(f"| {name} || failed: {r['error'].strip().splitlines()[-1][:80]} ||||||")
            continue
        tool, T, micro, ac = row(name)
        rates, trl = r["tokens_per_s"], results.get(f"trl-{ac}-{T}x{micro}", {})
        tps = median(rates)
        versus = f"{tps / median(trl['tokens_per_s']):.2f}x" if tool != "trl" and "tokens_per_s" in trl else "-"
        if tool == "after":  # this checkout's estimate (the run's own plan may be older)
            r = r | {"estimate": estimate(T, micro, ac)}
        est = f"{r['estimate'] / 2**30:.2f} ({r['estimate'] / r['peak']:.2f})" if "estimate" in r else "-"
        lines.append(f"| {name} | {r.get('runs', 1)} x {len(rates) // r.get('runs', 1)} | {r['peak'] / 2**30:.2f} | "
                     f"{(r['peak'] - state) / 2**30:.2f} | {est} | {tps:.0f} ({min(rates):.0f}-{max(rates):.0f}) | "
                     f"{versus} | {tps * flops[T] / peak_flops:.0%} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="all", help=f"all, or names from: {', '.join(ROWS)} "
                    "(or another micro-batch, as after-full-4096x8)")
    ap.add_argument("--steps", type=int, default=4, help="training steps a run (the first is not timed)")
    ap.add_argument("--repeat", type=int, default=1, help="run the rows this many times, in turn")
    ap.add_argument("--before", default=BEFORE, help="the commit to compare against")
    ap.add_argument("--out", default="scale.json")
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    names = list(ROWS) if args.rows == "all" else args.rows.split(",")
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    chat = write_chat(work)
    before = work / "before"
    for name in names * args.repeat:
        tool, T, micro, ac = row(name)
        print(f"{name} ...", flush=True)
        if tool == "trl":
            r = run_trl(name, T, micro, ac, work, chat, args.steps)
        else:
            if tool == "before" and not before.exists():
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before],
                               check=True, capture_output=True)
            r = run_llmforge(name, before if tool == "before" else REPO, T, micro, ac, work, args.steps)
        results[name] = merge(results.get(name), r)
        out.write_text(json.dumps(results, indent=1))
        print(f"  {r if 'error' not in r else r['error'][-500:]}", flush=True)
    if before.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], capture_output=True)
    # the best of every run's measurement: another process busy on this CPU can only lower it
    results["_matmul_peak"] = max(results.get("_matmul_peak", 0), matmul_peak())
    out.write_text(json.dumps(results, indent=1))
    print(table(results, results["_matmul_peak"]))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
