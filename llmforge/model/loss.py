"""Log-probabilities of target tokens without materializing the logits.

The output head is the widest matmul of a fine-tune: at Qwen2.5's 151,936-word vocabulary one
token's logits are 0.6 MB in fp32, and a plain cross-entropy keeps the bf16 logits, an fp32 copy
and the fp32 log-softmax for backward: several GB for one 4,096-token row. Here the rows go
through the head a chunk at a time (~128 MB of fp32 logits each), so the logits never exist whole.

Two ways, by what the loss does with them:
- summed_logprob (pretrain, sft: the loss is their sum): the forward turns each chunk's logits
  into its gradient while it holds them, as Liger's fused linear cross-entropy does on CUDA;
  backward only scales it. The head's logits are computed once.
- target_logprobs (dpo, grpo: each token's log-probability gets its own gradient): the forward
  keeps each row's log-sum-exp; backward recomputes a chunk's logits and turns them into its
  gradient in place. The recompute costs one more forward of the head, a third of its training
  FLOPs. Liger's and Cut Cross-Entropy's kernels avoid it only for a loss that ends the graph,
  and are Triton-only.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Logits per chunk: 128 MB in fp32. Each chunk reads the whole [V, d] weight, so fewer, larger
# chunks run the head faster: 2,048 rows at 151,936 words, one pass, 7.5-8.0 s on 2 CPU threads
# against 8.9 s at 64 MB (7.3-7.6 s at 256 MB, not worth its memory).
CHUNK_LOGITS = 2 ** 25


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary (220 at 151,936 words, 2,048 at 16k)."""
    return max(16, CHUNK_LOGITS // vocab)


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """[N, d] final hidden states, the head's [V, d] weight, [N] targets -> [N] log-probability
    of each target under softmax(hidden @ weight.T / temperature), computed in fp32 (bf16 loses
    about two digits on a 50k-way softmax). Targets < 0 get 0."""
    return _TargetLogprobs.apply(hidden, weight, targets, temperature)


def summed_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """The sum of target_logprobs (a scalar) with the head computed once: for a loss that only
    sums them (pretrain, sft), where dpo and grpo weight each token."""
    learn = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _SummedLogprob.apply(hidden, weight, targets, temperature, learn)


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        # backward runs outside autocast: remember it, so the recomputed logits are the same numbers
        ctx.amp, ctx.temperature = _amp(hidden), temperature
        n, valid = chunk_rows(weight.shape[0]), targets >= 0
        out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        picked = targets.clamp(min=0)[:, None]
        for i in range(0, len(hidden), n):
            logits = _logits(hidden[i:i + n], weight, temperature)
            target = logits.gather(1, picked[i:i + n])[:, 0]
            lse[i:i + n] = _exp_shifted(logits)[2][:, 0]
            out[i:i + n] = target - lse[i:i + n]
        ctx.save_for_backward(hidden, weight, targets, lse)
        return out * valid

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        scale = (grad * (targets >= 0)).float() / ctx.temperature
        grads = _Grads(hidden, weight, ctx.needs_input_grad, ctx.amp)
        for i in range(0, len(hidden), grads.n):
            with grads.amp():
                logits = _logits(hidden[i:i + grads.n], weight, ctx.temperature)
            softmax = logits.sub_(lse[i:i + grads.n, None]).exp_()  # in place: one [n, V] buffer
            grads.add(i, softmax.mul_(-scale[i:i + grads.n, None]), scale, targets)
        return *grads.result(), None, None


class _SummedLogprob(torch.autograd.Function):
    """The sum of the targets' log-probabilities, whose gradient is found during the forward.

    A scalar's upstream gradient only scales the whole gradient, so the forward, holding each
    chunk's logits anyway, turns them into the gradient there: the head's logits are computed
    once instead of twice, a quarter of what the head cost saved (Liger's fused linear
    cross-entropy does the same on CUDA). The [V, d] weight gradient is held from here to the
    start of backward, where autograd would allocate it anyway, so the peak does not grow."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, learn):  # learn: grad mode is off in here
        n, valid = chunk_rows(weight.shape[0]), targets >= 0
        picked, total = targets.clamp(min=0)[:, None], torch.zeros((), device=hidden.device)
        grads = _Grads(hidden, weight, ctx.needs_input_grad, _amp(hidden)) if learn else None
        scale = valid.float() / temperature
        for i in range(0, len(hidden), n):
            logits = _logits(hidden[i:i + n], weight, temperature)
            target = logits.gather(1, picked[i:i + n])[:, 0]
            shifted, sums, lse = _exp_shifted(logits)
            total += ((target - lse[:, 0]) * valid[i:i + n]).sum()
            if grads is not None:  # -scale x softmax, normalizing the shifted exponentials in one pass
                with torch.autocast(hidden.device.type, enabled=False):  # as backward would run
                    grads.add(i, shifted.mul_(-scale[i:i + n, None] / sums), scale, targets)
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is None:  # scaled in place below, so a second pass would be wrong
            raise RuntimeError("summed_logprob's gradient was used already: it cannot retain its graph")
        grad_hidden, grad_weight = ctx.grads.result()
        ctx.grads = None
        return (None if grad_hidden is None else grad_hidden.mul_(grad)), \
            (None if grad_weight is None else grad_weight.mul_(grad)), None, None, None


class _Grads:
    """The head's input and weight gradients, added up a chunk of rows at a time."""

    def __init__(self, hidden, weight, needs, amp):
        device, enabled, dtype = self.amp_state = amp
        self.hidden, self.weight, self.n = hidden, weight, chunk_rows(weight.shape[0])
        self.compute = dtype if enabled else weight.dtype  # the matmuls in the forward's precision
        self.hidden_grad = torch.empty_like(hidden) if needs[0] else None
        self.weight_grad = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        self.rows = torch.arange(self.n, device=hidden.device)

    def amp(self):
        device, enabled, dtype = self.amp_state
        return torch.autocast(device, dtype=dtype) if enabled else contextlib.nullcontext()

    def add(self, i, g, scale, targets):
        """g: chunk i's [n, V] fp32 -scale x softmax, overwritten. scale [N]: each row's upstream
        gradient (/ temperature), as d log p(y) / d logits = onehot(y) - softmax."""
        h = self.hidden[i:i + self.n]
        g[self.rows[:len(h)], targets[i:i + self.n].clamp(min=0)] += scale[i:i + self.n]
        g, h = g.to(self.compute), h.to(self.compute)
        if self.hidden_grad is not None:
            self.hidden_grad[i:i + self.n] = g @ self.weight.to(self.compute)
        if self.weight_grad is not None and g.dtype == self.weight_grad.dtype:
            self.weight_grad.addmm_(g.t(), h)
        elif self.weight_grad is not None:
            self.weight_grad += g.t() @ h

    def result(self):
        w = self.weight_grad
        return self.hidden_grad, None if w is None else w.to(self.weight.dtype)


def _amp(hidden):
    device = hidden.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _exp_shifted(logits):
    """[n, V] fp32 logits -> (exp(logits - each row's max), in place; their [n, 1] sums; the
    rows' log-sum-exp). torch's logsumexp writes a shifted copy first: 2.4x slower on a CPU."""
    top = logits.amax(-1, keepdim=True)
    shifted = logits.sub_(top).exp_()
    sums = shifted.sum(-1, keepdim=True)
    return shifted, sums, top + sums.log()


def _logits(hidden, weight, temperature):
    logits = F.linear(hidden, weight).float()
    return logits / temperature if temperature != 1.0 else logits
