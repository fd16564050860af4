"""Log-probabilities of target tokens without materializing the logits.

The output head is the widest matmul of a fine-tune: at Qwen2.5's 151,936-word vocabulary one
token's logits are 0.6 MB in fp32, and a plain cross-entropy keeps the bf16 logits, an fp32 copy
and the fp32 log-softmax for backward: several GB for one 4,096-token row. Here the rows go
through the head a chunk at a time (~64 MB of fp32 logits each), and forward keeps only each
row's log-sum-exp; backward recomputes a chunk's logits, turns them into its gradient in place,
and adds that chunk's share into one weight gradient. The recompute costs one more forward of
the head (about a third of its training FLOPs); Liger's and Cut Cross-Entropy's fused kernels
avoid it on CUDA, but are Triton-only and assume the loss is the graph's end, while dpo and grpo
need each token's log-probability with its own gradient (any upstream gradient works here).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

CHUNK_LOGITS = 2 ** 24  # logits per chunk: 64 MB in fp32


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary (110 at 151,936 words, 1,024 at 16k)."""
    return max(16, CHUNK_LOGITS // vocab)


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """[N, d] final hidden states, the head's [V, d] weight, [N] targets -> [N] log-probability
    of each target under softmax(hidden @ weight.T / temperature), computed in fp32 (bf16 loses
    about two digits on a 50k-way softmax). Targets < 0 get 0."""
    return _TargetLogprobs.apply(hidden, weight, targets, temperature)


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        device = hidden.device.type
        # backward runs outside autocast: remember it, so the recomputed logits are the same numbers
        ctx.amp = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.temperature = temperature
        n, valid = chunk_rows(weight.shape[0]), targets >= 0
        out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        picked = targets.clamp(min=0)[:, None]
        for i in range(0, len(hidden), n):
            logits = _logits(hidden[i:i + n], weight, temperature)
            lse[i:i + n] = logits.logsumexp(-1)
            out[i:i + n] = logits.gather(1, picked[i:i + n])[:, 0] - lse[i:i + n]
        ctx.save_for_backward(hidden, weight, targets, lse)
        return out * valid

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        device, amp, dtype = ctx.amp
        n, t = chunk_rows(weight.shape[0]), ctx.temperature
        # d log p(y) / d logits = onehot(y) - softmax, times the upstream gradient, / temperature
        scale = (grad * (targets >= 0)).float() / t
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        rows, compute = torch.arange(n, device=hidden.device), dtype if amp else weight.dtype
        for i in range(0, len(hidden), n):
            h, s = hidden[i:i + n], scale[i:i + n, None]
            with torch.autocast(device, dtype=dtype) if amp else contextlib.nullcontext():
                logits = _logits(h, weight, t)
            g = logits.sub_(lse[i:i + n, None]).exp_().mul_(-s)  # in place: one [n, V] buffer
            g[rows[:len(h)], targets[i:i + n].clamp(min=0)] += s[:, 0]
            g, h = g.to(compute), h.to(compute)  # the matmuls in the forward's precision, as autograd's
            if grad_hidden is not None:
                grad_hidden[i:i + n] = g @ weight.to(compute)
            if grad_weight is not None and g.dtype == grad_weight.dtype:
                grad_weight.addmm_(g.t(), h)
            elif grad_weight is not None:
                grad_weight += g.t() @ h
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def _logits(hidden, weight, temperature):
    logits = F.linear(hidden, weight).float()
    return logits / temperature if temperature != 1.0 else logits
