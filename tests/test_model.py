"""Tests for llmforge.model.transformer: tiny configs only, the whole file runs in a few seconds on CPU."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llmforge.model import attention as A
from llmforge.model import transformer as M
from llmforge.model.families import PRESETS
from llmforge.model.transformer import KVCache, ModelConfig, Transformer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: intra-op threads only add sync overhead, and on a busy 2-core box
    # OpenMP spin-waiting made one 40-step test take ~10 s instead of ~0.2 s.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32)


def build(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


def ids(T, B=1, seed=1, vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norm,positions,mlp,tie,bias,kv",
    list(itertools.product(("rmsnorm", "layernorm"), ("rope", "learned"), ("swiglu", "gelu"),
                           (False, True), (False, True), (None, 2))),
)
def test_num_params_matches_built_model(norm, positions, mlp, tie, bias, kv):
    cfg = ModelConfig(**TINY, norm=norm, positions=positions, mlp=mlp, tie_embeddings=tie,
                      bias=bias, n_kv_head=kv)
    model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())  # parameters() dedups ties
    emb = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if positions == "learned" else 0)
    assert cfg.num_params(exclude_embeddings=True) == cfg.num_params() - emb


def test_hidden_defaults():
    # 8/3*d rounded up to 64 (LLaMA rounds to its multiple_of; 256 for 7B would give 11008)
    assert ModelConfig(**{**TINY, "n_embd": 4096, "n_head": 32}).hidden == 10944
    assert ModelConfig(**TINY).hidden == 128  # 8*32//3 = 85 -> 128
    assert ModelConfig(**TINY, mlp="gelu").hidden == 4 * 32
    assert ModelConfig(**TINY, mlp_hidden=50).hidden == 50


def test_flops_per_token_formula():
    for kw in (dict(), PRESETS["gpt2"], dict(n_kv_head=1, mlp_hidden=40)):
        cfg = ModelConfig(**TINY, **kw)
        model = Transformer(cfg)
        # every nn.Linear is a matmul (lm_head too, even tied); biases and norms are not counted
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        L, d = cfg.n_layer, cfg.n_embd
        assert cfg.flops_per_token() == 6 * matmul + 12 * L * d * cfg.seq_len
        assert cfg.flops_per_token(seq_len=4) == 6 * matmul + 12 * L * d * 4


def test_dict_roundtrip_and_validation():
    cfg = ModelConfig(**TINY, **PRESETS["gpt2"], n_kv_head=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_experts": 8})
    with pytest.raises(ValueError, match="missing"):
        ModelConfig.from_dict({"vocab_size": 8})
    for bad in (dict(n_embd=30), dict(n_kv_head=3), dict(n_kv_head=0), dict(norm="batchnorm"),
                dict(positions="alibi"), dict(mlp="relu"), dict(dropout=1.0), dict(seq_len=0)):
        with pytest.raises(ValueError, match="ModelConfig"):
            ModelConfig(**{**TINY, **bad})
    with pytest.raises(ValueError, match="even head_dim"):  # head_dim 3
        ModelConfig(**{**TINY, "n_embd": 12, "n_head": 4})
    ModelConfig(**{**TINY, "n_embd": 12, "n_head": 4, "positions": "learned"})  # fine without rope


# ---- module structure -----------------------------------------------------------------------


def test_parameter_names_and_buffers():
    names = set(build().state_dict())
    for n in ("tok_emb.weight", "blocks.0.attn_norm.weight", "blocks.1.attn.q_proj.weight",
              "blocks.1.attn.k_proj.weight", "blocks.1.attn.v_proj.weight", "blocks.1.attn.o_proj.weight",
              "blocks.0.mlp_norm.weight", "blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.weight",
              "blocks.0.mlp.w3.weight", "norm.weight", "lm_head.weight"):
        assert n in names
    assert not any("rope" in n or "pos_emb" in n for n in names)  # rope tables are not persistent
    gpt2 = set(build(**PRESETS["gpt2"]).state_dict())
    assert {"pos_emb.weight", "blocks.0.mlp.c_fc.bias", "blocks.0.mlp.c_proj.weight", "norm.bias"} <= gpt2


def test_tied_embeddings_share_storage():
    model = build(tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert build(tie_embeddings=False).lm_head.weight is not build(tie_embeddings=False).tok_emb.weight


def test_init_is_deterministic_and_scaled():
    a, b = build(seed=3), build(seed=3)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.tok_emb.weight, build(seed=4).tok_emb.weight)
    big = Transformer(ModelConfig(vocab_size=64, seq_len=8, n_layer=8, n_head=4, n_embd=256))
    std = lambda t: t.std().item()  # noqa: E731
    assert std(big.blocks[0].attn.q_proj.weight) == pytest.approx(0.02, rel=0.05)
    assert std(big.blocks[0].attn.o_proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std(big.blocks[0].mlp.w2.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


# ---- forward --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_logits_shape_and_causality(preset):
    model = build(**PRESETS[preset], n_kv_head=2)
    x = ids(12, B=2)
    logits = model(x)
    assert logits.shape == (2, 12, TINY["vocab_size"]) and logits.dtype == torch.float32
    t = 7
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % TINY["vocab_size"]
    logits2 = model(y)
    torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(logits2[:, t:], logits[:, t:])
    with pytest.raises(ValueError, match="seq_len"):
        model(ids(TINY["seq_len"] + 1))


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("kv", [None, 2])
def test_kv_cache_matches_full_forward(positions, kv):
    model = build(positions=positions, n_kv_head=kv)
    x = ids(TINY["seq_len"], B=2)
    full = model(x)
    cache = KVCache(model.config.n_layer, TINY["seq_len"])
    parts = [model(x[:, :5], cache)]  # prefill
    parts += [model(x[:, t:t + 1], cache) for t in range(5, 10)]  # one-token decode
    parts.append(model(x[:, 10:], cache))  # multi-token chunk on top of a cache (explicit mask)
    assert cache.pos == TINY["seq_len"]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_rope_rotate_half_layout():
    cfg = ModelConfig(**TINY)  # head_dim 8, theta 1e4
    cos, sin = M.rope_tables(cfg)
    assert cos.shape == (cfg.seq_len, 8)
    x = torch.randn(1, 1, cfg.seq_len, 8, dtype=torch.float64)
    out = M.apply_rope(x, cos, sin)
    half = 4
    for p in (0, 3, 15):
        for i in range(half):  # HF Llama: pair (i, i + half) turns by p * theta^(-2i/head_dim)
            a = p * cfg.rope_theta ** (-2 * i / 8)
            x1, x2 = x[0, 0, p, i].item(), x[0, 0, p, i + half].item()
            assert out[0, 0, p, i].item() == pytest.approx(x1 * math.cos(a) - x2 * math.sin(a), abs=1e-5)
            assert out[0, 0, p, i + half].item() == pytest.approx(x2 * math.cos(a) + x1 * math.sin(a), abs=1e-5)
    # the point of RoPE: q.k depends only on the distance between positions
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda v, p: M.apply_rope(v.view(1, 1, 1, 8), cos[p:p + 1], sin[p:p + 1]).flatten()  # noqa: E731
    assert float(rot(q, 7) @ rot(k, 4)) == pytest.approx(float(rot(q, 13) @ rot(k, 10)), abs=1e-5)


def test_gqa_fallback_matches_enable_gqa(monkeypatch):
    model = build(n_kv_head=2)
    x = ids(10)
    ref = model(x)
    monkeypatch.setattr(A, "SDPA_HAS_GQA", not A.SDPA_HAS_GQA)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)


# ---- generation -----------------------------------------------------------------------------


def naive_greedy(model, prompt, n):
    """Full forward every step, with the same crop policy as generate()."""
    seq_len, out, window = model.config.seq_len, [], prompt[0, -model.config.seq_len:].tolist()
    for _ in range(n):
        if len(window) > seq_len:
            window = window[-(seq_len // 2):]
        tok = int(model(torch.tensor([window]))[0, -1].argmax())
        out.append(tok)
        window.append(tok)
    return out


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_greedy_generate_matches_naive_loop(preset):
    model = build(**PRESETS[preset])
    prompt = ids(5)
    got = list(model.generate(prompt, 8, temperature=0))
    assert got == naive_greedy(model, prompt, 8)
    assert all(isinstance(t, int) for t in got)


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_generate_past_seq_len(preset):
    model = build(**PRESETS[preset], seq_len=8)
    prompt = ids(11)  # longer than seq_len already
    got = list(model.generate(prompt, 30, temperature=0))
    assert len(got) == 30
    assert got == naive_greedy(model, prompt, 30)


def test_generate_sampling_and_stop():
    model = build()
    prompt = ids(4)
    run = lambda **kw: list(model.generate(prompt, 10, generator=torch.Generator().manual_seed(0), **kw))  # noqa: E731
    assert run(temperature=0.8, top_k=5) == run(temperature=0.8, top_k=5)  # seeded -> reproducible
    assert run(top_k=1) == list(model.generate(prompt, 10, temperature=0))  # top_k=1 is greedy
    first = run(temperature=0)[0]
    assert run(temperature=0, stop_ids={first}) == [first]  # stop token is yielded, then stop
    assert list(model.generate(prompt, 0)) == []
    gen = model.generate(prompt, 3)
    assert isinstance(next(gen), int)  # streams lazily
    with pytest.raises(ValueError):
        list(model.generate(prompt[0], 3))


# ---- training sanity ------------------------------------------------------------------------


def test_untrained_loss_is_near_log_vocab():
    vocab = 512
    for preset in ("llama", "gpt2"):
        model = build(**{**PRESETS[preset], "vocab_size": vocab, "n_embd": 64})
        x = ids(16, B=4, vocab=vocab)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        assert abs(loss.item() - math.log(vocab)) < 0.3


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_adamw_learns_a_repeated_sequence(preset):
    model = build(**PRESETS[preset], dropout=0.1).train()
    x = ids(TINY["seq_len"] + 1, B=4)
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
