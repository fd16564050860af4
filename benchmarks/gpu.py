"""GPU throughput: tokens/s, MFU and peak memory of llama-preset models (~125M and ~350M
parameters) at seq_len 1024 and 2048, trained the way llmforge trains on a GPU (bf16 autocast,
fp32 master weights, fused AdamW, torch.compile, flash attention through SDPA), with the plan's
memory estimate beside the measured peak. Run through benchmarks/gpu.sh.

    python benchmarks/gpu.py            # on a CUDA machine: the full table (a few minutes)
    python benchmarks/gpu.py --dry      # anywhere: tiny shapes, a few steps, no compile (CI)

The micro-batch is the planner's (plan/estimates.py: choose_micro_batch): the largest that divides the
batch and fits the device by the plan's estimate (here, its free memory). Batches are random ids: this measures the model's
step, not the data pipeline (benchmarks/baseline_loop.py measures the engine around it).
"""

from __future__ import annotations

import argparse
import time

import torch

from llmforge.model.families import PRESETS
from llmforge.model.transformer import ModelConfig, Transformer
from llmforge.optim import build_optimizer
from llmforge.plan.devices import Device, peak_flops
from llmforge.plan.estimates import choose_micro_batch
from llmforge.run import distributed
from llmforge.run.step import autocast
from llmforge.stages.pretrain import token_losses

MODELS = {"~125M": dict(n_layer=12, n_head=12, n_embd=768), "~350M": dict(n_layer=24, n_head=16, n_embd=1024)}
DRY = {"tiny": dict(n_layer=2, n_head=2, n_embd=64)}


def device_for(dry: bool) -> Device:
    if dry or not torch.cuda.is_available():
        return Device("cpu", "CPU", 8 << 30, "fp32", False, torch.get_num_threads(), None)
    name = torch.cuda.get_device_properties(0).name
    free, _ = torch.cuda.mem_get_info()
    return Device("cuda", name, free, "bf16", True, 0, peak_flops("cuda", name, "bf16"))


def measure(cfg: ModelConfig, seq_len: int, device: Device, steps: int, warmup: int, batch: int) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device.type)
    model = Transformer(cfg).to(dev)
    step_model = distributed.wrap(model, "single", distributed.Dist(), dev, bf16=False, compile=device.compile)
    opt = build_optimizer(model, {"name": "adamw", "lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1})
    micro, estimate, _ = choose_micro_batch("benchmark", "auto", batch, seq_len, cfg, device, 1)
    amp = autocast(device)
    tokens = torch.randint(0, cfg.vocab_size, (micro, seq_len + 1), device=dev)

    def step():
        for _ in range(batch // micro):
            with amp:
                loss = token_losses(step_model, tokens).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(warmup):  # compilation, autotuning, allocator warm-up
        step()
    sync()
    compile_s = time.perf_counter() - start
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    tok_s = steps * batch * seq_len / elapsed
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return {"micro": micro, "tok_s": tok_s, "warmup_s": compile_s, "peak": peak,
            "mfu": tok_s * cfg.flops_per_token(seq_len) / device.peak_flops if device.peak_flops else None,
            "estimate": estimate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU, a few steps (CI)")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    device = device_for(args.dry)
    models, lengths = (DRY, (64, 128)) if args.dry else (MODELS, (1024, 2048))
    steps, warmup = args.steps or (2 if args.dry else 10), 1 if args.dry else 3
    batch = 4 if args.dry else 32  # sequences per optimizer step
    print(f"device: {device.name} ({device.precision}, compile {'on' if device.compile else 'off'})"
          + ("" if device.peak_flops else "; no peak FLOP/s known, so no MFU"))
    print(f"{'model':8} {'params':>8} {'seq':>5} {'micro':>5} {'tok/s':>10} {'MFU':>6} {'warm-up s':>9} "
          f"{'peak GiB':>9} {'plan GiB':>9} {'plan/peak':>9}")
    for label, shape in models.items():
        for seq_len in lengths:
            cfg = ModelConfig(vocab_size=32000 if not args.dry else 256, seq_len=seq_len, **shape, **PRESETS["llama"])
            r = measure(cfg, seq_len, device, steps, warmup, batch)
            peak = f"{r['peak'] / 2**30:9.2f}" if r["peak"] else f"{'-':>9}"
            ratio = f"{r['estimate'] / r['peak']:9.2f}" if r["peak"] else f"{'-':>9}"
            mfu = f"{r['mfu']:6.1%}" if r["mfu"] else f"{'-':>6}"
            print(f"{label:8} {cfg.num_params() / 1e6:7.0f}M {seq_len:>5} {r['micro']:>5} {r['tok_s']:>10,.0f} {mfu} "
                  f"{r['warmup_s']:>9.1f} {peak} {r['estimate'] / 2**30:9.2f} {ratio}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
