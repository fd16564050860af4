"""Log-probabilities of target tokens without materializing the logits.

The output head is the widest matmul of a fine-tune: at Qwen2.5's 151,936-word vocabulary one
token's logits are 0.6 MB in fp32, and a plain cross-entropy keeps the bf16 logits, an fp32 copy
and the fp32 log-softmax for backward: several GB for one 4,096-token row. Here the rows go
through the head a chunk at a time (~64 MB of fp32 logits each); under autograd each chunk is
checkpointed, so backward recomputes its logits instead of keeping them. The recompute costs
one more forward of the head (about a third of its training FLOPs); Liger's and Cut
Cross-Entropy's fused kernels avoid it on CUDA, but are Triton-only and assume the loss is the
graph's end, while dpo and grpo need each token's log-probability with its own gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_LOGITS = 2 ** 24  # logits per chunk: 64 MB in fp32


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary (128 at 151,936 words, 1,024 at 16k)."""
    return max(16, CHUNK_LOGITS // vocab)


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """[N, d] final hidden states, the head's [V, d] weight, [N] targets -> [N] log-probability
    of each target under softmax(hidden @ weight.T / temperature), computed in fp32 (bf16 loses
    about two digits on a 50k-way softmax). Targets < 0 get 0."""
    n = chunk_rows(weight.shape[0])
    if hidden.shape[0] <= n:
        return _logprobs(hidden, weight, targets, temperature)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for i in range(0, hidden.shape[0], n):
        args = (hidden[i:i + n], weight, targets[i:i + n], temperature)
        parts.append(checkpoint(_logprobs, *args, use_reentrant=False, preserve_rng_state=False)
                     if grad else _logprobs(*args))
    return torch.cat(parts)


def _logprobs(hidden, weight, targets, temperature):
    logits = F.linear(hidden, weight).float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets.clamp(min=0), reduction="none") * (targets >= 0)
