"""The post-training and infrastructure sections of benchmarks/gpu_check.py: adapters (LoRA,
QLoRA), grpo's ratio gap, DDP/FSDP at world size 1, and the checkpoint stall. One function each,
printing RESULT lines as they go (gpu_check_common.report)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpu_check_common import (ADAMW, Ctx, attempt, config, error_text, fresh_dynamo, gib, measure_steps, peak, report,
                              reset_peak, sync, token_rows, train)
from llmforge.model import adapters
from llmforge.model.families import PRESETS
from llmforge.model.generate import generate_batch
from llmforge.model.transformer import ModelConfig, Transformer
from llmforge.model.weights import weight_names
from llmforge.optim import build_optimizer
from llmforge.plan.estimates import choose_micro_batch
from llmforge.run import distributed
from llmforge.run.distributed import Dist
from llmforge.stages import pretrain
from llmforge.stages.kind import to_device
from llmforge.store.checkpoint import read_checkpoint, save_checkpoint

# -- adapters ------------------------------------------------------------------------------------

LORA = {"rank": 16, "alpha": 32, "targets": ["all-linear"], "dropout": 0.0}


def section_adapters(ctx: Ctx) -> None:
    """LoRA and QLoRA, eager and compiled, on 4 layers of the 350M at 1024 (what is asked here
    is dtypes, crashes and tracing, not speed at depth, and 4 layers compile far faster than 24);
    a biased QLoRA model (§1.5's crash)."""
    cfg = config(ctx, n_layer=2 if ctx.dry else 4, seq_len=128 if ctx.dry else 1024)
    batch = {"tokens": token_rows(np.random.default_rng(0), 2 if ctx.dry else 8, cfg.seq_len, cfg.vocab_size)}
    no_qlora = "qlora needs a CUDA GPU" if not ctx.cuda else None
    if no_qlora is None:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # noqa: BLE001 - not installed, or built for another CUDA
            no_qlora = f"bitsandbytes does not import ({error_text(e)})"
    for kind in ("lora", "qlora"):
        for compiled in (False, True):
            case = f"{kind}_{'compiled' if compiled else 'eager'}"
            if kind == "qlora" and no_qlora:
                report(case, skipped=no_qlora)
                continue
            attempt(case, adapter_run, ctx, case, cfg, kind, compiled, batch)
    # gpt2's preset has biases everywhere: bnb's small-M kernel (M <= 1536: here one row of 512)
    # compares the fp32 bias with bf16 activations.
    gpt2 = ModelConfig(**(PRESETS["gpt2"] | dict(vocab_size=cfg.vocab_size, seq_len=512 if not ctx.dry else 64,
                                                  n_layer=2, n_head=cfg.n_head, n_embd=cfg.n_embd)))
    if no_qlora:
        report("qlora_gpt2_bias", skipped=no_qlora)
    else:
        one = {"tokens": token_rows(np.random.default_rng(1), 1, gpt2.seq_len, gpt2.vocab_size)}
        attempt("qlora_gpt2_bias", adapter_run, ctx, "qlora_gpt2_bias", gpt2, "qlora", False, one)


def adapter_run(ctx: Ctx, case: str, cfg: ModelConfig, kind: str, compiled: bool, batch: dict) -> None:
    spec = LORA | {"kind": kind}
    fresh_dynamo()
    torch.manual_seed(0)
    model = Transformer(cfg)  # as the engine does: qlora quantizes each layer onto the device, then the rest moves
    adapters.apply(model, spec, device=ctx.dev)
    model.to(ctx.dev)
    rows = len(batch["tokens"])
    # the plan's frozen bytes for qlora (plan/adapter.py): the targeted weights at 4 bits + scales
    quantized = adapters.targeted_weights(cfg, spec)
    frozen = (cfg.num_params() - quantized) * 4 + quantized * (0.5 + 1 / 32) if kind == "qlora" else None
    micro, estimate, _ = choose_micro_batch("gpu_check adapters", "auto", rows, cfg.seq_len, cfg, ctx.device, 1,
                                            trainable=adapters.adapter_params(cfg, spec), frozen_bytes=frozen)
    dtypes = {}
    if not compiled:  # §1.5: what reaches the first q_proj (bnb's matmul_4bit under QLoRA), and what leaves it
        model.blocks[0].attn.q_proj.register_forward_hook(
            lambda m, i, o: dtypes.update(q_proj_in=str(i[0].dtype), q_proj_out=str(o.dtype)))
    step_model = distributed.wrap(model, "single", Dist(), ctx.dev, bf16=ctx.cuda, compile=compiled)
    optimizer = build_optimizer(model, ADAMW)
    objective = pretrain.Objective(None, np.ones(cfg.vocab_size, dtype=np.int64))
    first, times, loss, used = measure_steps(ctx, step_model, optimizer, objective, batch, micro, 2)
    out = {"micro": micro, "trainable": adapters.count(model)[0], "first_step_s": first,
           "tok_s": rows * cfg.seq_len * len(times) / sum(times), "peak_gib": gib(used),
           "estimate_gib": gib(estimate), "loss": loss, **dtypes}
    # Merging: give B a real size first (3 steps leave it near its zero start), then compare the
    # merged model's logits with the adapter's, on the bare module.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, adapters.LoRALinear):
                m.lora_B.normal_(0, 0.02)
        x = torch.from_numpy(batch["tokens"][:2, :64]).to(ctx.dev)
        model.eval()
        with ctx.amp:
            before = model(x).float()
            adapters.merge(model)
            after = model(x).float()
    report(case, **out, merged_rel_err=((after - before).abs().max() / before.abs().max()).item())


# -- grpo ----------------------------------------------------------------------------------------

def section_grpo(ctx: Ctx) -> None:
    """§1.4: grpo's pi_old is the sampler's log-prob (KV-cached decode, a mask per step); its new
    log-prob comes from the training forward (one causal pass, maybe compiled). In fp32 they agree
    to ~1e-6; here is how far apart they start in bf16, and how many ratios the clip then cuts."""
    cfg = config(ctx)
    torch.manual_seed(0)
    model = Transformer(cfg).to(ctx.dev)
    step_model = distributed.wrap(model, "single", Dist(), ctx.dev, bf16=ctx.cuda, compile=True)
    # A random model's next-token distribution is nearly flat (a sampled token's log-prob ~ -10); a
    # trained one's is peaked, and bf16's rounding grows with the logits: the second round scales
    # the output head by 6 to come closer to that (its sampled_logp_mean says how close).
    for label, scale in (("init", 1.0), ("sharp", 6.0)):
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        tokens, learned, old = rollout(ctx, model, cfg, label)
        eager = attempt(f"{label}_eager", ratio_gap, ctx, f"{label}_eager", model, tokens, learned, old)
        compiled = attempt(f"{label}_compiled", ratio_gap, ctx, f"{label}_compiled", step_model, tokens, learned, old)
        if eager is not None and compiled is not None:  # grpo's frozen reference runs eager, the policy compiled
            report(f"{label}_eager_vs_compiled", gap_max_abs=(compiled - eager).abs().max().item(),
                   gap_mean_abs=(compiled - eager).abs().mean().item())


def rollout(ctx: Ctx, model, cfg: ModelConfig, label: str) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """generate_batch as grpo's rollout calls it (64 prompts of 32-256 tokens, 64 new at T 1), then
    the rows grpo trains on (grpo.py _rows): (tokens, learned, the sampler's log-probs in row order)."""
    B, max_new = (8, 8) if ctx.dry else (64, 64)
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 17, B) if ctx.dry else rng.integers(32, 257, B)
    prompts = torch.zeros(B, int(lengths.max()), dtype=torch.long)
    for i, n in enumerate(lengths):
        prompts[i, :n] = torch.from_numpy(rng.integers(0, cfg.vocab_size, n))
    generator = torch.Generator(device=ctx.dev).manual_seed(0)
    model.eval()
    base = reset_peak(ctx)
    start = time.perf_counter()
    with ctx.amp:
        got = generate_batch(model, prompts.to(ctx.dev), torch.from_numpy(lengths).to(ctx.dev), max_new,
                             temperature=1.0, top_k=None, generator=generator, stop_ids=(cfg.vocab_size - 1,),
                             vocab_limit=cfg.vocab_size)
    sync(ctx)
    model.train()
    spent, steps = time.perf_counter() - start, int(got["n"].max())
    sampled = torch.arange(max_new, device=ctx.dev) < got["n"][:, None]
    old = got["logps"][sampled].float()  # row by row, as the learned targets below
    report(f"{label}_generate", rows=B, new_tokens=steps, s=spent, ms_per_step=spent / steps * 1e3,
           extra_gib=gib(peak(ctx, base)), sampled_logp_mean=old.mean().item())
    tokens = np.zeros((B, cfg.seq_len + 1), dtype=np.int64)
    learned = np.zeros((B, cfg.seq_len), dtype=bool)
    for i, (p, k) in enumerate(zip(lengths, got["n"].tolist())):  # prompt, then reply; learned: its targets
        tokens[i, :p], tokens[i, p:p + k] = prompts[i, :p].numpy(), got["new"][i, :k].cpu().numpy()
        learned[i, p - 1:p - 1 + k] = True
    return tokens, learned, old


def ratio_gap(ctx: Ctx, case: str, model, tokens: np.ndarray, learned: np.ndarray, old: torch.Tensor) -> torch.Tensor:
    """The training forward's log-probs of the sampled tokens (grpo's token_logps: same call, with
    gradients on as in the loss) against the sampler's; returns the forward's."""
    parts, start, micro = [], time.perf_counter(), 4 if ctx.dry else 16
    for i in range(0, len(tokens), micro):
        batch = to_device({"tokens": tokens[i:i + micro], "learned": learned[i:i + micro]}, ctx.dev)
        with ctx.amp:
            logp = model(batch["tokens"][:, :-1], keep=batch["learned"], targets=batch["tokens"][:, 1:],
                         temperature=1.0)
        parts.append(logp.detach().float())
    new = torch.cat(parts)
    gap = new - old
    ratio = gap.exp()
    report(case, tokens=gap.numel(), s=time.perf_counter() - start, gap_mean=gap.mean().item(),
           gap_mean_abs=gap.abs().mean().item(), gap_max_abs=gap.abs().max().item(),
           outside_clip_0_2=((ratio < 0.8) | (ratio > 1.2)).float().mean().item())
    return new


# -- fsdp1 ---------------------------------------------------------------------------------------

def section_fsdp1(ctx: Ctx) -> None:
    """distributed.wrap's ddp and fsdp branches in a one-rank process group (nccl for CUDA tensors,
    gloo for CPU ones, as distributed.init), compiled as the engine compiles: does the code run."""
    import torch.distributed as dist
    import torch.distributed.device_mesh as device_mesh

    store = Path(tempfile.mkdtemp()) / "store"
    if ctx.cuda:
        torch.cuda.set_device(0)  # as distributed.init: nccl's device for this rank
    dist.init_process_group("cpu:gloo,cuda:nccl" if ctx.cuda else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)
    # wrap() returns the bare model at world size 1 (the plan never asks for ddp or fsdp there), so
    # it is handed a Dist of 2 and builds its FSDP mesh over the one rank this group has.
    real_mesh = device_mesh.init_device_mesh
    device_mesh.init_device_mesh = lambda kind, shape, **kw: real_mesh(kind, (1,), **kw)
    try:
        for mode in ("ddp", "fsdp"):
            attempt(mode, wrapped_run, ctx, mode)
    finally:
        device_mesh.init_device_mesh = real_mesh
        dist.destroy_process_group()
        shutil.rmtree(store.parent, ignore_errors=True)


def wrapped_run(ctx: Ctx, mode: str) -> None:
    cfg = config(ctx, n_layer=2, seq_len=128 if ctx.dry else 1024)
    rows, micro = 8, 4  # two micro-batches a step: the first without gradient sync
    batch = {"tokens": token_rows(np.random.default_rng(0), rows, cfg.seq_len, cfg.vocab_size)}
    fresh_dynamo()
    torch.manual_seed(0)
    model = Transformer(cfg).to(ctx.dev)
    names = weight_names(model)  # before wrapping: FSDP shards the same names in place
    start = time.perf_counter()
    step_model = distributed.wrap(model, mode, Dist(world=2), ctx.dev, bf16=ctx.cuda, compile=True)
    optimizer = build_optimizer(model, ADAMW)  # after wrapping, as the engine (FSDP's shards)
    objective = pretrain.Objective(None, np.ones(cfg.vocab_size, dtype=np.int64))
    times, loss = train(ctx, step_model, optimizer, objective, batch, micro, 3)  # train_step's own Dist(): world 1
    weights, state = distributed.full_state(model, optimizer)
    report(mode, wrapped=type(step_model).__name__, s=time.perf_counter() - start, step_s=times, loss=loss,
           tensors=len(weights), names_match=sorted(set(weights) & set(names)) == sorted(names),
           optimizer_entries=len(state["state"]), weights_gib=gib(sum(t.nbytes for t in weights.values())))


# -- checkpoint ----------------------------------------------------------------------------------

def section_checkpoint(ctx: Ctx) -> None:
    """The stall of one checkpoint of the 350M with its AdamW state (~4.4 GB, review P9):
    full_state (to the CPU), save_checkpoint (safetensors, checksums, fsync), read_checkpoint."""
    cfg = config(ctx)
    torch.manual_seed(0)
    model = Transformer(cfg).to(ctx.dev)
    optimizer = build_optimizer(model, ADAMW)
    for p in model.parameters():  # one step on zero gradients: AdamW's state exists, as after training
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(ctx)
    folder = Path(tempfile.mkdtemp())  # local disk, never $OUT: it comes back to the caller
    try:
        start = time.perf_counter()
        weights, state = distributed.full_state(model, optimizer)
        gathered = time.perf_counter()
        path = save_checkpoint(folder / "checkpoints", 1, weights, state, {"stage": "gpu_check"}, keep=1)
        saved = time.perf_counter()
        read_checkpoint(path)
        done = time.perf_counter()
        size = sum(f.stat().st_size for f in path.iterdir())
        report("checkpoint", gib=gib(size), full_state_s=gathered - start, save_s=saved - gathered,
               read_s=done - saved, stall_s=saved - start, save_gb_per_s=size / 1e9 / (saved - gathered))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
