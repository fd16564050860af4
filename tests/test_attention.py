"""Attention without a dense mask (model/attention.py) and the chunked log-probabilities
(model/loss.py) against the plain dense computations they replace, in fp32 within 1e-5:
every family's attention (GQA, qk-norm, biases, learned positions, sliding windows), packed
documents, values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmforge.model import attention as A
from llmforge.model import loss as L
from llmforge.model.attention import DocLayout
from llmforge.model.families import PRESETS
from llmforge.model.transformer import ModelConfig, Transformer

TOL = dict(rtol=0, atol=1e-5)


def dense(q, k, v, visible):
    """Plain softmax attention with an explicit [.., T, T] mask: the reference."""
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def docs_of(lengths_per_row):
    T = sum(lengths_per_row[0])
    return np.stack([np.repeat(np.arange(len(row)), row) for row in lengths_per_row if sum(row) == T])


def visibility(docs, window=None):
    d = torch.from_numpy(docs)
    T = d.shape[1]
    i = torch.arange(T)
    seen = (d[:, None, :, None] == d[:, None, None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        seen &= i[None, :] > i[:, None] - window
    return seen


def qkv(B, H, KV, T, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, hd, generator=g, requires_grad=True) for h in (H, KV, KV)]


@pytest.mark.parametrize("window", [None, 5, 16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_packed_and_windowed_attention_equal_the_dense_mask(window, heads):
    H, KV = heads
    docs = docs_of([[9, 1, 14, 8], [32], [3, 3, 26]])  # one long doc, one-token docs, a row of one
    q, k, v = qkv(3, H, KV, 32)
    got = A.packed(q, k, v, DocLayout.from_docs(docs), window=window)
    want = dense(q, k, v, visibility(docs, window))
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b, **TOL)
    # a row without packing: causal, windowed in blocks (T not a multiple of the window)
    single = np.zeros((3, 32), dtype=np.int64)
    torch.testing.assert_close(A.causal(q, k, v, window=window), dense(q, k, v, visibility(single, window)), **TOL)


def test_layout_groups_by_length_and_puts_every_position_back():
    docs = docs_of([[1, 2, 3, 4, 5, 49], [64], [60, 4]])
    lay = DocLayout.from_docs(docs)
    # lengths 33-64 (49, 64, 60) pad to 64; 5 alone; 3-4 (3, 4, 4) to 4; 2; 1: never twice the shortest
    assert lay.groups == ((3, 64), (1, 5), (3, 4), (1, 2), (1, 1))
    assert sum(n * L for n, L in lay.groups) == len(lay.gather)
    assert np.array_equal(lay.gather.numpy()[lay.scatter.numpy()], np.arange(docs.size))  # scatter undoes gather
    assert lay.positions.tolist()[2] == list(range(60)) + list(range(4))


FAMILIES = {
    "llama-gqa": dict(PRESETS["llama"], n_kv_head=2),
    "qwen2": dict(PRESETS["qwen2"], n_kv_head=2),
    "qwen3": dict(PRESETS["qwen3"], n_kv_head=1, head_dim=12),
    "mistral-window": dict(PRESETS["mistral"], n_kv_head=2, sliding_window=6),
    "gpt2": dict(PRESETS["gpt2"]),
}


def family_model(name):
    cfg = {k: v for k, v in FAMILIES[name].items() if k in ModelConfig.__dataclass_fields__}
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg | dict(vocab_size=96, seq_len=40, n_layer=2, n_head=4, n_embd=32))).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_packed_document_is_computed_as_it_would_be_alone(family):
    model = family_model(family)
    lengths = [7, 12, 1, 20]
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    docs = docs_of([lengths])
    packed = model(ids, docs=DocLayout.from_docs(docs))
    alone = torch.cat([model(part) for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, **TOL)
    assert torch.equal(model(ids, docs=torch.from_numpy(docs)), packed)  # ids as a tensor: the same path


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_the_full_log_softmax(monkeypatch, temperature):
    monkeypatch.setattr(L, "CHUNK_LOGITS", 50 * 16)  # 16 rows a chunk at vocab 50: 7 chunks for 100 rows
    g = torch.Generator().manual_seed(0)
    h = torch.randn(100, 24, generator=g, requires_grad=True)
    w = torch.randn(50, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (100,), generator=g)
    got = L.target_logprobs(h, w, t, temperature)
    want = torch.log_softmax((h @ w.T) / temperature, -1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(got, want, **TOL)
    up = torch.randn(100, generator=g)  # any upstream gradient (dpo weighs each sequence's tokens)
    for a, b in zip(torch.autograd.grad(got, (h, w), up), torch.autograd.grad(want, (h, w), up)):
        torch.testing.assert_close(a, b, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(L.target_logprobs(h, w, t, temperature), want, **TOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_summed_logprob_finds_the_same_gradient_in_its_forward(monkeypatch, temperature):
    """pretrain's and sft's loss: the sum, its gradient found while the forward holds each chunk's
    logits, then scaled by whatever the upstream gradient turns out to be (here 0.37, as the step
    divides by tokens and micro-batches). Ignored targets (< 0) count nowhere."""
    monkeypatch.setattr(L, "CHUNK_LOGITS", 50 * 16)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(100, 24, generator=g, requires_grad=True)
    w = torch.randn(50, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (100,), generator=g)
    t[::7] = -100
    want = (torch.log_softmax((h @ w.T) / temperature, -1).gather(1, t.clamp(min=0)[:, None])[:, 0] * (t >= 0)).sum()
    got = L.summed_logprob(h, w, t, temperature)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # a sum of ~1,000: relative
    wanted = torch.autograd.grad(0.37 * want, (h, w))
    for a, b in zip(torch.autograd.grad(0.37 * got, (h, w)), wanted):
        torch.testing.assert_close(a, b, **TOL)
    h2 = h.detach().requires_grad_()  # only the hidden states learn (a frozen, adapted head)
    (grad_h,) = torch.autograd.grad(0.37 * L.summed_logprob(h2, w.detach(), t, temperature), (h2,))
    torch.testing.assert_close(grad_h, wanted[0], **TOL)
    with torch.no_grad():  # evals: no gradient is found
        torch.testing.assert_close(L.summed_logprob(h, w, t, temperature), want.detach(), rtol=1e-6, atol=1e-5)
    twice = L.summed_logprob(h, w, t, temperature)
    twice.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="used already"):
        twice.backward()


def test_the_model_sums_target_logprobs_with_the_same_gradients(monkeypatch):
    monkeypatch.setattr(L, "CHUNK_LOGITS", 96 * 8)
    model = family_model("llama-gqa").train()  # tied embeddings' gradient adds the head's and the lookup's
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(6))
    keep = torch.rand(2, 20, generator=torch.Generator().manual_seed(7)) > 0.3
    got = model(ids[:, :-1], keep=keep, targets=ids[:, 1:], summed=True)
    want = model(ids[:, :-1], keep=keep, targets=ids[:, 1:]).sum()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    a = torch.autograd.grad(got, list(model.parameters()))
    for x, y in zip(a, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(x, y, **TOL)


def test_the_model_returns_target_logprobs_equal_to_its_logits(monkeypatch):
    monkeypatch.setattr(L, "CHUNK_LOGITS", 96 * 8)
    model = family_model("llama-gqa").train()
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(4))
    keep = torch.rand(2, 20, generator=torch.Generator().manual_seed(5)) > 0.3
    got = model(ids[:, :-1], keep=keep, targets=ids[:, 1:])
    want = -F.cross_entropy(model(ids[:, :-1], keep=keep), ids[:, 1:][keep], reduction="none")
    torch.testing.assert_close(got, want, **TOL)
    a = torch.autograd.grad(got.sum(), list(model.parameters()))
    b = torch.autograd.grad(want.sum(), list(model.parameters()))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL)
    full = model(ids[:, :-1], targets=ids[:, 1:])
    assert full.shape == (2, 20)


def test_chunked_logprobs_under_bf16_autocast_stay_close_to_fp32(monkeypatch):
    """Under autocast the head's matmuls run in bf16 (forward, and the recompute in backward);
    the softmax and the sums stay fp32."""
    monkeypatch.setattr(L, "CHUNK_LOGITS", 50 * 16)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(100, 24, generator=g, requires_grad=True)
    w = torch.randn(50, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (100,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.target_logprobs(h, w, t)
    assert got.dtype == torch.float32
    want = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=0, atol=0.25)  # bf16 logits of size ~5: ~2 digits
    for a, b in zip(torch.autograd.grad(got.sum(), (h, w)), torch.autograd.grad(want.sum(), (h, w))):
        assert (a - b).norm() / b.norm() < 0.05
