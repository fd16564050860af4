"""What training will cost on a device: peak memory (which also picks the micro-batch), wall
time and disk. The plan prints them; benchmarks/estimates.py checks them against measurements."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PlanError
from ..model.loss import chunk_rows
from ..model.recompute import checkpointed_blocks
from ..model.transformer import ModelConfig

if TYPE_CHECKING:
    from .devices import Device


def estimate_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str, shards: int = 1,
                    accumulating: bool = False, cpu: bool = False, logit_share: float = 1.0,
                    trainable: int | None = None, frozen_bytes: float | None = None,
                    checkpointing: str = "none", beside: tuple[float, float] = (0.0, 0.0),
                    down_adapter: bool = False) -> int:
    """Peak training memory per device in bytes: weights + grads + AdamW moments + activations
    + one chunk of logits.

    fp32 master weights and grads (4 + 4 bytes/param) and two AdamW moments (8 bytes/param).
    Activations: per token per layer, the tensors autograd keeps for backward — about 8 x n_embd
    (norm inputs/outputs, q/k/v, attention output, residuals) + 2 x mlp hidden for SwiGLU
    (model/swiglu.py; 4 where an adapter wraps its w2, or for GELU) — at 4 bytes, or 2 under
    bf16/fp16 autocast. Attention keeps no T x T anything (model/attention.py). A
    checkpointed block keeps only its fp32 input and its down projection's output (4 + 4 or 2 bytes
    x n_embd: model/recompute.py), and backward holds one block's full activations at a time
    while it recomputes it. A block's saved activations go as its weight gradients come, so they
    count only beyond the gradients' size (with fresh gradients on one device). Logits: the head
    runs a chunk of rows at a time (model/loss.py), so only one chunk's logits, log-softmax and
    gradient exist at once; sft and dpo compute them for learned targets alone (logit_share: the
    largest share of a row's positions they are).
    On a CPU the process's resident memory is what counts; above HANDS_BACK freed blocks go back
    to the OS (run/prepare.py), so it follows what is held; below, the heap keeps about 1.3
    layers' worth of freed temporaries and 16 MiB more. Fitted to its measured growth (models of 4-32
    layers, 128-576 wide, benchmarks/estimates.py; Qwen2.5-0.5B's shape at 2,048-8,192 tokens
    with and without checkpointing, benchmarks/scale.py): the saved activations counted here,
    ~2.8 copies of the logits chunk, one [vocab, n_embd] gradient beside the weights' own and ~32
    MiB that any training process grows by (autograd's and the allocator's own; most of a tiny
    model's growth).
    With `trainable` (an adapter's parameter count) the model's weights are frozen: 4 bytes each,
    and the 16 only for the adapter (qlora: `frozen_bytes`, its layers at ~0.5 a weight); the
    activations backward needs are the same. Loading for qlora quantizes each layer as it moves to
    the device (model/adapters.py), so that load peaks below training (one weight in bf16 more).
    `beside` (stages/kind.py memory_beside): what the stage holds throughout (grpo's reference),
    and what it holds instead of training's activations (grpo's rollout).
    """
    tokens = micro_batch * seq_len
    act_bytes = 4 if precision == "fp32" else 2
    mlp = 2 if cfg.mlp == "swiglu" and not down_adapter else 4
    per_token_layer = (8 * cfg.n_embd + 2 * cfg.kv_heads * cfg.head_dim + mlp * cfg.hidden) * act_bytes
    checkpointed = checkpointed_blocks(cfg.n_layer, checkpointing)
    # Backward frees a block's saved activations as it makes that block's weight gradients, so with
    # fresh gradients (set_to_none, no accumulation) on one device a block adds to the states (which
    # count every gradient) only what it saves beyond its gradients' size: a checkpointed
    # Qwen2.5-0.5B block's input and down projection at 8,192 tokens (59 MB) adds nothing.
    grads = 0 if accumulating or shards > 1 or trainable is not None else \
        cfg.num_params(exclude_embeddings=True) / cfg.n_layer * 4
    saved = (cfg.n_layer - checkpointed) * max(tokens * per_token_layer - grads, 0) \
        + checkpointed * max(tokens * (4 + act_bytes) * cfg.n_embd - grads, 0)
    # While backward recomputes a block, its activations are held and its gradients' temporaries
    # beside them: about 1.5 blocks' worth on Qwen2.5-0.5B's shape (benchmarks/scale.py, 2,048 to
    # 8,192 tokens; it was 5 before freed memory went back to the OS at once).
    recompute = 1.5 * per_token_layer if checkpointed else 0
    activations = saved + tokens * recompute + 2 * tokens * cfg.n_embd * 4
    logits = min(tokens * logit_share, chunk_rows(cfg.vocab_size)) * cfg.vocab_size * 4
    frozen = cfg.num_params() * 4 if frozen_bytes is None else frozen_bytes
    states = cfg.num_params() * 16 / shards if trainable is None else frozen + trainable * 16
    if shards > 1:  # FSDP: a shard of the states, plus the unsharded weights and grads in flight
        embeddings = cfg.num_params() - cfg.num_params(exclude_embeddings=True)
        states += (embeddings + 2 * cfg.num_params(exclude_embeddings=True) / cfg.n_layer) * 8
        if accumulating:  # unsynchronized micro-batches keep whole fp32 gradients until the last
            states += cfg.num_params() * 4
    # The output head's and the embedding's [vocab, n_embd] gradients exist beside the weights' own
    # at the end of backward (the embedding's is dense): at Qwen2.5's vocabulary 0.5 GB each.
    head = cfg.vocab_size * cfg.n_embd * 4
    resident, rollout = beside
    if cpu:  # a fit: no slack added; ~32 MiB a training process grows by whatever its size
        training = activations + 2.8 * logits + head
        held = states + resident + max(training, rollout) + 32 * 2**20
        if held <= HANDS_BACK:  # glibc's heap as it is: it keeps about a layer's freed temporaries more
            held += 1.3 * tokens * per_token_layer + 16 * 2**20
        return int(held)
    return int((states + resident + max(activations + 3 * logits + head, rollout)) * 1.1)  # ~10%: allocator slack


# A CPU run planned to peak above this hands freed memory back to the OS at once (run/prepare.py);
# below it, glibc's faster default stands.
HANDS_BACK = 2**30


# The share of a device's memory training may use: a CPU's is shared with the system, the data and
# other processes; a GPU's caching allocator needs slack and workspaces beyond what it holds.
_USABLE = (0.6, 0.9)  # cpu, gpu
# Tokens per forward pass worth having: CPUs gain little past it, and a GPU at 16k tokens a
# forward is busy enough that recomputing activations to fit more would cost more than it gains.
WANTED_TOKENS = 16384


def memory_budget(device: Device) -> float:
    return device.memory_bytes * _USABLE[device.type != "cpu"]


def choose_micro_batch(where, requested, per_rank: int, seq_len: int, cfg, device, shards: int,
                       logit_share: float = 1.0, trainable: int | None = None,
                       frozen_bytes: float | None = None, checkpointing: str = "none",
                       beside: tuple[float, float] = (0.0, 0.0), down_adapter: bool = False) -> tuple[int, int, str]:
    """(micro-batch, its estimated peak memory, activation checkpointing). Under checkpointing
    auto: none, unless selective or full is what lets a larger micro-batch fit, up to the one
    wanted (WANTED_TOKENS per forward, or the whole per-device batch)."""
    kw = {"logit_share": logit_share, "trainable": trainable, "frozen_bytes": frozen_bytes, "beside": beside,
          "down_adapter": down_adapter}
    if checkpointing != "auto":
        return (*_micro_batch(where, requested, per_rank, seq_len, cfg, device, shards, checkpointing, kw),
                checkpointing)
    wanted = max(1, min(per_rank, WANTED_TOKENS // seq_len))
    best, problem = None, None
    for mode in ("none", "selective", "full"):
        try:
            micro, memory = _micro_batch(where, requested, per_rank, seq_len, cfg, device, shards, mode, kw)
        except PlanError as e:
            problem = e  # the last: full checkpointing's, the least any mode needs
            continue
        if best is None or micro > best[0]:
            best = (micro, memory, mode)
        if micro >= wanted:
            break
    if best is None:
        raise problem
    return best


def _micro_batch(where, requested, per_rank, seq_len, cfg, device, shards, checkpointing, kw) -> tuple[int, int]:
    budget, cpu = memory_budget(device), device.type == "cpu"
    kw = kw | {"cpu": cpu, "checkpointing": checkpointing}
    if requested != "auto":
        if per_rank % requested:
            raise PlanError(f"runtime.micro_batch: {requested} does not divide the {per_rank} sequences "
                            f"per step and device of {where}", hint="use a divisor, or auto")
        return requested, estimate_memory(cfg, requested, seq_len, device.precision, shards, requested < per_rank, **kw)
    # CPUs gain little past WANTED_TOKENS per forward; GPUs take the largest micro-batch that fits.
    cap = WANTED_TOKENS if cpu else 1 << 30
    # Memory grows linearly with the micro-batch: only divisors up to what could fit are tried,
    # so a huge batch is answered at once rather than by counting down from it.
    one, two = (estimate_memory(cfg, d, seq_len, device.precision, shards, **kw) for d in (1, 2))
    fits = int((budget - one) / max(two - one, 1)) + 2
    top = max(1, min(per_rank, max(1, cap // seq_len), fits))
    divisors = (d for d in range(top, 0, -1) if per_rank % d == 0)
    for d in divisors:
        memory = estimate_memory(cfg, d, seq_len, device.precision, shards, d < per_rank, **kw)
        if (d * seq_len <= cap or d == 1) and memory <= budget:
            return d, memory
    need = estimate_memory(cfg, 1, seq_len, device.precision, shards, **kw)
    ac = "" if checkpointing == "full" else " (runtime.activation_checkpointing: full would need less)"
    raise PlanError(f"model: needs ~{need / 2**30:.1f} GiB to train even at micro-batch 1, more than the "
                    f"{budget / 2**30:.1f} GiB usable ({_USABLE[not cpu]:.0%}) of the {device.memory_bytes / 2**30:.1f} "
                    f"GiB this {device.type} offers{ac}",
                    hint="use a smaller model or seq_len, or an adapter (adapter: {kind: lora})")


def estimate_time(flops: float, cfg: ModelConfig, micro: int, seq_len: int, device: Device, *, steps: int = 1,
                  world_size: int = 1, synced_bytes: float = 0) -> float | None:
    """Wall time at a typical 40% of peak on GPU (devices.ASSUMED_MFU); on CPU, 50% of a measured
    matmul's speed. Where the link between devices is known, a step takes at least the time its
    collectives need: a ring moves 2(n-1)/n of the bytes (all-reduce) each way per device, and
    overlaps them with the backward pass, so the longer of the two bounds the step."""
    from .devices import ASSUMED_MFU

    if device.peak_flops:
        compute = flops / (ASSUMED_MFU * device.peak_flops)
    elif device.type == "cpu":
        compute = flops / (0.5 * _cpu_matmul_flops(micro * seq_len, cfg.n_embd, cfg.hidden))
    else:
        return None
    if world_size > 1 and device.link_bytes_per_s:
        talk = steps * synced_bytes * (world_size - 1) / world_size / device.link_bytes_per_s
        return max(compute, talk)
    return compute


_CALIBRATION: dict = {}


def _cpu_matmul_flops(m: int, k: int, n: int) -> float:
    """FLOP/s of this CPU on a matmul shaped like the model's MLP (measured once, ~0.1 s)."""
    import torch

    m = min(m, 4096)
    if (m, k, n) not in _CALIBRATION:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        start, reps = time.perf_counter(), 0
        while time.perf_counter() - start < 0.05 or reps < 3:
            a @ b
            reps += 1
        _CALIBRATION[(m, k, n)] = 2 * m * k * n * reps / (time.perf_counter() - start)
    return _CALIBRATION[(m, k, n)]


def checkpoint_bytes(sp) -> int:
    """One checkpoint of a stage: what trains, in fp32, and AdamW's two moments of it (Muon keeps
    one for its matrices: this is the upper bound)."""
    return sp.trainable_params * 12


def disk_warnings(stages, params: int, run_dir: Path) -> list[str]:
    """A warning when the disk under run_dir cannot hold what the stages still to run keep: each
    its newest checkpoint.keep checkpoints and its final weights, plus one checkpoint in the making."""
    needed = largest = 0
    for sp in stages:
        if (run_dir / "stages" / sp.dir_name / "final" / "model.safetensors").is_file():
            continue
        saves = (sp.steps - 1) // sp.checkpoint_every + 1 if sp.checkpoint_every else 1  # the last step's too
        needed += min(sp.checkpoint_keep, saves) * checkpoint_bytes(sp) + params * 4
        largest = max(largest, checkpoint_bytes(sp))
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed + largest <= free:
        return []
    def size(n: float) -> str:
        return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    return [f"{run_dir}: the disk has {size(free)} free, and the stages still to run keep about "
            f"{size(needed + largest)} of checkpoints and final weights; the run would stop when it fills "
            "(lower checkpoint.keep, free space, or pick another --run-dir)"]
