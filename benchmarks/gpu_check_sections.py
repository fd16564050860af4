"""The model-side sections of benchmarks/gpu_check.py (env, attention, pretrain, sft), one function
each, and `run`, which a child process calls with a section's name. The post-training and
infrastructure sections are in gpu_check_post.py. Each prints RESULT lines (gpu_check_common.report)
as it goes, one per case."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_check_common import (ADAMW, Ctx, attempt, config, dynamo_stats, error_text, free, fresh_dynamo, gib, mib,
                              measure_steps, packed_rows, peak, random_docs, report, reset_peak, setup, sync, token_rows,
                              train)
from llmforge.model import attention
from llmforge.model.attention import DocLayout
from llmforge.model.recompute import checkpoint_blocks
from llmforge.model.transformer import Transformer
from llmforge.optim import build_optimizer
from llmforge.plan.estimates import choose_micro_batch
from llmforge.run import distributed
from llmforge.run.distributed import Dist
from llmforge.run.step import evaluate
from llmforge.stages import pretrain, sft

TRIGGERED = re.compile(r"\s*\(Triggered internally at [^)]*\)\.?")  # where in torch a warning came from
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


# -- env -----------------------------------------------------------------------------------------

def section_env(ctx: Ctx) -> None:
    """Versions, the device the plan sees, the SDPA backend order, autocast's dtypes, and the
    matmul ceiling MFU is best read against (the H100 here ran 769-798 TFLOP/s, review §0)."""
    def imported(module):
        try:
            return getattr(importlib.import_module(module), "__version__", "?")
        except Exception as e:  # noqa: BLE001 - a missing wheel, or one built for another CUDA
            return "no: " + error_text(e)

    def installed(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    d = ctx.device
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if ctx.cuda else None, "pydantic": imported("pydantic"),
            "bitsandbytes": imported("bitsandbytes"), "transformers": installed("transformers"),
            "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "plan_device": d.name, "plan_precision": d.precision, "plan_compile": d.compile,
            "plan_peak_tflops": d.peak_flops / 1e12 if d.peak_flops else None, "plan_memory_gib": gib(d.memory_bytes)}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count}
        try:  # the power limit and clocks bound the matmul ceiling below
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.max.mem",
                 "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = error_text(e)
    report("versions", **info)

    names = {b.value: name for name, b in SDPBackend.__members__.items()}
    order = torch._C._get_sdp_priority_order() if hasattr(torch._C, "_get_sdp_priority_order") else []
    impls = getattr(torch.nn.attention, "list_flash_attention_impls", list)()
    report("sdpa", priority=",".join(names.get(i, str(i)) for i in order), flash_impls=",".join(impls),
           flash=torch.backends.cuda.flash_sdp_enabled(), efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
           cudnn=torch.backends.cuda.cudnn_sdp_enabled(), math=torch.backends.cuda.math_sdp_enabled())

    # §1.5: is rms_norm on autocast's fp32 list (bf16 in, fp32 out: then QLoRA's 4-bit matmul gets
    # fp32 activations)? And a Linear's output under autocast, for comparison.
    x, w = torch.randn(8, 64, device=ctx.dev, dtype=torch.bfloat16), torch.ones(64, device=ctx.dev)
    try:
        with ctx.amp:
            report("autocast", rms_norm_of_bf16=str(F.rms_norm(x, (64,), w.bfloat16()).dtype),
                   linear_of_fp32=str(F.linear(x.float(), torch.ones(64, 64, device=ctx.dev)).dtype))
    except Exception as e:  # noqa: BLE001 - the matmul below matters more
        report("autocast", error=error_text(e))

    n, dtype, reps = (512, torch.float32, 3) if ctx.dry else (8192, torch.bfloat16, 30)
    a, b = (torch.randn(n, n, device=ctx.dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(ctx)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(ctx)
    flops = 2 * n**3 * reps / (time.perf_counter() - start)
    report("matmul", n=n, dtype=str(dtype), tflops=flops / 1e12,
           of_plan_peak=flops / d.peak_flops if d.peak_flops else None)


# -- attention -----------------------------------------------------------------------------------

def section_attention(ctx: Ctx) -> None:
    """llmforge's attention paths against SDPA with a dense boolean mask (what model.py did
    before, §1.2) and against the math kernel, on the 350M's heads (B 8, T 2048, 16 x 64)."""
    B, T, H, hd, W = (2, 128, 4, 16, 32) if ctx.dry else (8, 2048, 16, 64, 512)
    docs, _ = random_docs(np.random.default_rng(0), B, T, ctx.docs)
    cases = [("causal_mha", H, False, None), ("causal_gqa", ctx.gqa, False, None), ("docs_mha", H, True, None),
             ("docs_gqa", ctx.gqa, True, None), ("window_mha", H, False, W), ("window_gqa", ctx.gqa, False, W),
             ("docs_window_gqa", ctx.gqa, True, W)]
    for name, kv, packed, window in cases:
        attempt(name, attention_case, ctx, name, (B, H, kv, T, hd), docs if packed else None, window)
    attempt("compiled_causal_gqa", compiled_causal, ctx, (B, H, ctx.gqa, T, hd))
    attempt("compiled_packed", compiled_packed, ctx, (B, H, ctx.gqa, T, hd))  # last: it may compile 3 times


def qkv(ctx: Ctx, shape: tuple) -> list[torch.Tensor]:
    B, H, KV, T, hd = shape
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    g = torch.Generator(device=ctx.dev).manual_seed(0)
    return [torch.randn(B, h, T, hd, device=ctx.dev, dtype=dtype, generator=g).requires_grad_() for h in (H, KV, KV)]


def visibility(ctx: Ctx, docs: np.ndarray, window: int | None) -> torch.Tensor:
    """[B, 1, T, T] bool: same document, not ahead, within the window (the dense mask)."""
    d, i = torch.from_numpy(docs).to(ctx.dev), torch.arange(docs.shape[1], device=ctx.dev)
    seen = (d[:, :, None] == d[:, None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        seen &= i[None, :] > i[:, None] - window
    return seen[:, None]


def fwd_bwd(ctx: Ctx, fn, grad, params) -> torch.Tensor:
    with ctx.amp:  # as in the model, where the projections' outputs arrive in bf16
        y = fn()
    y.backward(grad)
    for p in params:
        p.grad = None
    return y.detach()


def measure(ctx: Ctx, label: str, fn, grad, params, ref=None) -> dict:
    """fwd+bwd ms, the memory it adds beyond its inputs, the error against an fp32 reference."""
    base = reset_peak(ctx)
    y = fwd_bwd(ctx, fn, grad, params)  # also the warm-up
    extra = peak(ctx, base)
    reps = 1 if ctx.dry else 5
    sync(ctx)
    start = time.perf_counter()
    for _ in range(reps):
        fwd_bwd(ctx, fn, grad, params)
    sync(ctx)
    out = {f"{label}_ms": (time.perf_counter() - start) / reps * 1e3, f"{label}_extra_mib": mib(extra)}
    if ref is not None:
        out[f"{label}_err"] = (y.float() - ref).abs().max().item()
    return out


def accepted(ctx: Ctx, fn, grad, params) -> tuple[str, dict]:
    """The SDPA backends that run fn's forward and backward alone, and why each other refused
    (torch warns its reasons before raising 'No available kernel')."""
    took, why = [], {}
    for name, backend in BACKENDS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    fwd_bwd(ctx, fn, grad, params)
                sync(ctx)
                took.append(name)
            except Exception as e:  # noqa: BLE001
                reasons = [TRIGGERED.sub("", str(w.message)).replace("\n", " ").strip() for w in caught]
                why[name] = "; ".join(dict.fromkeys(reasons or [error_text(e)]))[:400]
    return ",".join(took), why


def top_kernels(ctx: Ctx, fn, grad, params, n: int = 4) -> list[str]:
    """The kernels (CPU: the ops) that took longest in one fwd+bwd: which backend really ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if ctx.cuda else ProfilerActivity.CPU]) as prof:
        fwd_bwd(ctx, fn, grad, params)
        sync(ctx)
    if ctx.cuda:
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        events.sort(key=lambda e: getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0),
                    reverse=True)
    else:
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [e.key[:100] for e in events[:n]]


def attention_case(ctx: Ctx, name: str, shape: tuple, docs: np.ndarray | None, window: int | None) -> None:
    q, k, v = qkv(ctx, shape)
    B, T = shape[0], shape[3]
    layout = DocLayout.from_docs(docs).to(ctx.dev) if docs is not None else None
    seen = visibility(ctx, docs if docs is not None else np.zeros((B, T), dtype=np.int64), window)

    def ours():  # what Attention.forward calls for a training row
        if layout is not None:
            return attention.packed(q, k, v, layout, window=window)
        return attention.causal(q, k, v, window=window)

    def dense():
        return attention.sdpa(q, k, v, mask=seen)

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = attention.sdpa(q.float(), k.float(), v.float(), mask=seen)
    grad, params = torch.randn_like(q), (q, k, v)
    out = {"kv_heads": shape[2], "window": window, "groups": len(layout.groups) if layout else None}
    out |= measure(ctx, "ours", ours, grad, params, ref) | measure(ctx, "dense", dense, grad, params, ref)
    with sdpa_kernel([SDPBackend.MATH]):
        out |= measure(ctx, "math", dense, grad, params)
    out["ours_takes"], refusals = accepted(ctx, ours, grad, params)
    out["dense_takes"], dense_refusals = accepted(ctx, dense, grad, params)
    try:
        kernels = {"ours": top_kernels(ctx, ours, grad, params), "dense": top_kernels(ctx, dense, grad, params)}
    except Exception as e:  # noqa: BLE001 - a profiler that cannot start is no reason to lose the case
        kernels = {"error": error_text(e)}
    report(name, **out, kernels=kernels, refusals={"ours": refusals, "dense": dense_refusals})


def compiled_packed(ctx: Ctx, shape: tuple) -> None:
    """Compiled packed attention over micro-batches of different document layouts: a DocLayout's
    `groups` are Python ints, so a new layout may mean a new graph (§1.7's recompile limit)."""
    fresh_dynamo()
    fn = torch.compile(attention.packed)
    q, k, v = qkv(ctx, shape)
    grad, rng, times, graphs = torch.randn_like(q), np.random.default_rng(1), [], []
    for _ in range(2 if ctx.dry else 3):
        layout = DocLayout.from_docs(random_docs(rng, shape[0], shape[3], ctx.docs)[0]).to(ctx.dev)
        start = time.perf_counter()
        fwd_bwd(ctx, lambda lay=layout: fn(q, k, v, lay), grad, (q, k, v))
        sync(ctx)
        times.append(time.perf_counter() - start)
        graphs.append(dynamo_stats()["graphs"])
    report("compiled_packed", call_s=times, graphs_after_each=graphs, **dynamo_stats())


def compiled_causal(ctx: Ctx, shape: tuple) -> None:
    fresh_dynamo()
    fn = torch.compile(attention.causal)
    q, k, v = qkv(ctx, shape)
    grad = torch.randn_like(q)
    start = time.perf_counter()
    fwd_bwd(ctx, lambda: fn(q, k, v), grad, (q, k, v))
    sync(ctx)
    first = time.perf_counter() - start
    out = measure(ctx, "compiled", lambda: fn(q, k, v), grad, (q, k, v))
    report("compiled_causal_gqa", first_call_s=first, **out,
           kernels=top_kernels(ctx, lambda: fn(q, k, v), grad, (q, k, v)), **dynamo_stats())


# -- pretrain ------------------------------------------------------------------------------------

def section_pretrain(ctx: Ctx) -> None:
    """The 350M at 2048 through train_step at the planner's micro-batch, eager then compiled
    (§2's MFU target is 50%; the review expects 35-45% compiled, 20-30% eager)."""
    cfg, rows = config(ctx), 4 if ctx.dry else 32  # rows: sequences per optimizer step
    T = cfg.seq_len
    micro, estimate, ac = choose_micro_batch("gpu_check pretrain", "auto", rows, T, cfg, ctx.device, 1)
    report("plan", params_m=cfg.num_params() / 1e6, rows=rows, micro=micro, grad_accum=rows // micro,
           checkpointing=ac, estimate_gib=gib(estimate), flops_per_token=cfg.flops_per_token(T))
    batch = {"tokens": token_rows(np.random.default_rng(0), rows, T, cfg.vocab_size)}
    objective = pretrain.Objective(None, np.ones(cfg.vocab_size, dtype=np.int64))  # token_bytes: evals only
    for compiled in (False, True):
        attempt("compiled" if compiled else "eager", pretrain_run, ctx, cfg, batch, objective, micro, ac,
                estimate, compiled)


def pretrain_run(ctx, cfg, batch, objective, micro, ac, estimate, compiled) -> None:
    case, rows, T = "compiled" if compiled else "eager", len(batch["tokens"]), cfg.seq_len
    fresh_dynamo()
    torch.manual_seed(0)
    model = Transformer(cfg).to(ctx.dev)
    checkpoint_blocks(model, ac)  # as the engine: before wrapping
    step_model = distributed.wrap(model, "single", Dist(), ctx.dev, bf16=ctx.cuda, compile=compiled)
    optimizer = build_optimizer(model, ADAMW)
    first, times, loss, used = measure_steps(ctx, step_model, optimizer, objective, batch, micro, 2 if ctx.dry else 5)
    tok_s = rows * T * len(times) / sum(times)
    report(case, first_step_s=first, step_s=float(np.median(times)), tok_s=tok_s,
           mfu=tok_s * cfg.flops_per_token(T) / ctx.device.peak_flops if ctx.device.peak_flops else None,
           peak_gib=gib(used), reserved_gib=gib(torch.cuda.max_memory_reserved()) if ctx.cuda else None,
           peak_over_estimate=used / estimate if used else None, loss=loss, **(dynamo_stats() if compiled else {}))
    if not compiled:
        return
    # gpu.py's bare loop on the same compiled module, ids already on the device: what the engine's
    # step costs around the model (host copies, two syncs a step; review P4).
    tokens = torch.from_numpy(batch["tokens"]).to(ctx.dev)
    sync(ctx)
    start = time.perf_counter()
    for _ in range(len(times)):
        for i in range(0, rows, micro):
            with ctx.amp:
                loss = pretrain.token_losses(step_model, tokens[i:i + micro]).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(ctx)
    bare = rows * T * len(times) / (time.perf_counter() - start)
    report("compiled_bare_loop", tok_s=bare, engine_over_bare=tok_s / bare)
    # The engine evaluates through the compiled module: a no_grad graph of its own (§1.7).
    evals = {"val": {"tokens": batch["tokens"][:micro]}}
    spent = []
    for _ in range(2):
        start = time.perf_counter()
        evaluate(step_model, objective, evals, micro, ctx.dev, ctx.amp)
        spent.append(time.perf_counter() - start)
    report("compiled_eval", first_s=spent[0], again_s=spent[1], **dynamo_stats())


# -- sft -----------------------------------------------------------------------------------------

def section_sft(ctx: Ctx) -> None:
    """Packed rows through the sft objective (to_device builds the DocLayout), MHA and GQA, at the
    planner's micro-batch; then a compiled model over steps of fresh layouts."""
    rows, rng = 4 if ctx.dry else 32, np.random.default_rng(0)
    for name, kv in (("mha", None), ("gqa", ctx.gqa)):
        cfg = config(ctx, n_kv_head=kv)
        batch = packed_rows(rng, rows, cfg.seq_len, cfg.vocab_size, ctx.docs)
        share = float((batch["targets"] != -1).sum(1).max()) / cfg.seq_len  # the plan's logit_share
        micro, estimate, ac = choose_micro_batch("gpu_check sft", "auto", rows, cfg.seq_len, cfg, ctx.device, 1,
                                                 logit_share=share)
        for m in dict.fromkeys((micro, min(micro, 2))):  # after an OOM at the planner's, micro-batch 2
            try:
                sft_run(ctx, name, cfg, batch, m, ac, estimate if m == micro else None)
                break
            except torch.cuda.OutOfMemoryError as e:
                report(name, micro=m, checkpointing=ac, estimate_gib=gib(estimate), oom=True, error=error_text(e))
            except Exception as e:  # noqa: BLE001
                report(name, micro=m, error=error_text(e))
                break
            finally:
                free()
    attempt("compiled_layouts", sft_compiled, ctx, rng)


def sft_run(ctx, name, cfg, batch, micro, ac, estimate) -> None:
    torch.manual_seed(0)
    model = Transformer(cfg).to(ctx.dev)
    checkpoint_blocks(model, ac)
    step_model = distributed.wrap(model, "single", Dist(), ctx.dev, bf16=ctx.cuda, compile=False)
    optimizer = build_optimizer(model, ADAMW)
    objective = sft.Objective(None, np.ones(cfg.vocab_size, dtype=np.int64))
    first, times, loss, used = measure_steps(ctx, step_model, optimizer, objective, batch, micro, 2)
    report(name, micro=micro, checkpointing=ac, kv_heads=cfg.kv_heads, first_step_s=first,
           tok_s=batch["inputs"].size * len(times) / sum(times), peak_gib=gib(used),
           estimate_gib=gib(estimate), peak_over_estimate=used / estimate if used and estimate else None, loss=loss)


def sft_compiled(ctx: Ctx, rng) -> None:
    """A compiled GQA model (4 layers of the 350M's width: what recompiles is the same at 24) over
    steps whose rows pack different documents: seconds and graphs after each step."""
    cfg = config(ctx, n_kv_head=ctx.gqa, n_layer=2 if ctx.dry else 4)
    micro = 2 if ctx.dry else 4
    fresh_dynamo()
    torch.manual_seed(0)
    model = Transformer(cfg).to(ctx.dev)
    step_model = distributed.wrap(model, "single", Dist(), ctx.dev, bf16=ctx.cuda, compile=True)
    optimizer = build_optimizer(model, ADAMW)
    objective = sft.Objective(None, np.ones(cfg.vocab_size, dtype=np.int64))
    for step in range(2 if ctx.dry else 4):
        batch = packed_rows(rng, micro, cfg.seq_len, cfg.vocab_size, ctx.docs)
        (s,), _ = train(ctx, step_model, optimizer, objective, batch, micro, 1)
        report("compiled_layout_step", step=step, s=s, **dynamo_stats())


# -- the child process's entry ---------------------------------------------------------------------

def run(name: str, dry: bool) -> None:
    import gpu_check_post

    sections = {"env": section_env, "attention": section_attention, "pretrain": section_pretrain,
                "sft": section_sft, "adapters": gpu_check_post.section_adapters, "grpo": gpu_check_post.section_grpo,
                "fsdp1": gpu_check_post.section_fsdp1, "checkpoint": gpu_check_post.section_checkpoint}
    sections[name](setup(dry))
