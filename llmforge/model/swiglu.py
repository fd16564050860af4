"""SwiGLU's down projection, w2(silu(a) * b), keeping a and b for backward and nothing else.

Plain autograd keeps four hidden-wide tensors per token and layer here: a for silu, silu(a) and
b for the product, the product for w2. Those are the widest activations of a LLaMA-style block
(hidden ~ 2.7-5.4 x n_embd): at Qwen2.5-0.5B's shape, 2,048 tokens, 1.9 GB. Backward recomputes
silu(a) and the product from a and b, two elementwise passes beside the matmuls it does anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weight, bias):
        # a and b come from w1 and w3 in the compute dtype (bf16 under autocast): work in it, as
        # autocast's linear would, and hand the weight back its gradient in its own dtype.
        ctx.save_for_backward(a, b, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(a).mul_(b), weight.to(a.dtype), None if bias is None else bias.to(a.dtype))

    @staticmethod
    def backward(ctx, grad):
        # In place where it can: each [tokens, hidden] temporary is a fresh allocation (on a CPU,
        # fresh pages from the OS: run/prepare.py).
        a, b, weight = ctx.saved_tensors
        sig = torch.sigmoid(a)
        p = a * sig  # silu(a)
        grad_p = grad @ weight.to(grad.dtype)
        grad_b = grad_p * p
        flat = grad.reshape(-1, grad.shape[-1])
        grad_weight = (flat.t() @ p.mul_(b).reshape(-1, a.shape[-1])).to(weight.dtype)  # p: the product
        del p
        # silu'(a) = sig(a) (1 + a (1 - sig(a)))
        grad_a = torch.sub(1, sig).mul_(a).add_(1).mul_(sig).mul_(b).mul_(grad_p)
        grad_bias = flat.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_a, grad_b, grad_weight, grad_bias


def swiglu_down(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(silu(a) * b, weight, bias), saving only a and b for backward."""
    return _SwiGLUDown.apply(a, b, weight, bias)
