"""A decoder-only transformer in one file, in the spirit of nanoGPT's model.py.

ModelConfig switches between the GPT-2 and LLaMA families (see families/), with the options the
open models built on LLaMA add: biases on q/k/v only (Qwen2), RMSNorm on each head's queries and
keys and a head size of its own (Qwen3), Llama 3's rope scaling, a sliding attention window
(Mistral, Phi-3). No I/O, devices, parallelism or recipes here: callers build a config, move
the model and wrap it as they like.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention
from .attention import DocLayout, KVCache
from .kept import Kept
from .loss import summed_logprob, target_logprobs
from .recompute import recomputed
from .rope import apply_rope, rope_tables
from .swiglu import swiglu_down

NORMS, POSITIONS, MLPS = ("rmsnorm", "layernorm"), ("rope", "learned"), ("swiglu", "gelu")


def _check(ok: bool, msg: str):
    if not ok:
        raise ValueError(f"ModelConfig: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    seq_len: int  # longest sequence; sizes the position tables
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None  # None -> n_head (plain MHA); fewer -> grouped-query attention
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    positions: str = "rope"  # "rope" | "learned"
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    mlp_hidden: int | None = None  # None -> see `hidden`
    tie_embeddings: bool = False
    dropout: float = 0.0
    bias: bool = False  # in every Linear except lm_head, and in LayerNorm
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    head_dim: int | None = None  # None -> n_embd // n_head; Qwen3 sets its own (q/k/v are n_head * head_dim wide)
    qkv_bias: bool = False  # biases on the q, k, v projections even where `bias` is off (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before rope (Qwen3)
    # Llama 3.1's long-context rope: {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None: plain rope.
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # a query sees only the last sliding_window keys (itself included)
    family: str = "llama"  # the Hugging Face model_type it exports as (llama, gpt2, qwen2, qwen3, mistral, phi3)

    def __post_init__(self):  # internal guards; the recipe layer reports user errors earlier
        if self.head_dim is None:  # resolved here, so equal configs compare equal however they were written
            _check(self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} not divisible by n_head {self.n_head}")
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name, ok in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS)):
            _check(getattr(self, name) in ok, f"{name} must be one of {ok}, got {getattr(self, name)!r}")
        _check(self.kv_heads >= 1 and self.n_head % self.kv_heads == 0,
               f"n_kv_head {self.n_kv_head} must be >= 1 and divide n_head {self.n_head}")
        _check(self.positions != "rope" or self.head_dim % 2 == 0,
               f"rope needs an even head_dim, got {self.head_dim}")
        _check(self.rope_scaling is None or (self.rope_scaling.get("type") == "llama3" and self.positions == "rope"),
               f"rope_scaling must be None or llama3 scaling of rope, got {self.rope_scaling}")
        _check(self.sliding_window is None or self.sliding_window >= 1, "sliding_window must be >= 1")
        _check(self.mlp_hidden is None or self.mlp_hidden >= 1, f"mlp_hidden must be >= 1, got {self.mlp_hidden}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(min(self.norm_eps, self.init_std, self.rope_theta) > 0, "norm_eps, init_std, rope_theta must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def q_dim(self) -> int:
        """Width of the queries (and of attention's output): n_head * head_dim."""
        return self.n_head * self.head_dim

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None or self.mlp == "gelu":
            return self.mlp_hidden or 4 * self.n_embd  # GPT-2: 4 * n_embd
        # SwiGLU has three matrices, not two, so LLaMA takes 2/3 of 4*d to keep the parameter count,
        # then rounds up to `multiple_of` for matmul-friendly shapes. We use 64; LLaMA-7B used 256
        # (d=4096: 8*d/3=10922 -> 10944 here, 11008 there).
        return 64 * ((8 * self.n_embd // 3 + 63) // 64)

    def _matmul_weights(self) -> int:
        """Weights of all blocks' matrices plus lm_head (biases, norms, lookup tables excluded)."""
        d, kv = self.n_embd, self.kv_heads * self.head_dim
        n_mats = 3 if self.mlp == "swiglu" else 2
        return self.n_layer * (2 * d * self.q_dim + 2 * d * kv + n_mats * d * self.hidden) + self.vocab_size * d

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """From the config alone; equals sum(p.numel() for p in Transformer(self).parameters()).
        exclude_embeddings drops the lookup tables tok_emb and pos_emb (so a tied lm_head, which *is*
        tok_emb, goes too); an untied lm_head is a real matmul and stays."""
        d, h, kv, b = self.n_embd, self.hidden, self.kv_heads * self.head_dim, int(self.bias)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        biases = b * (d + (2 * h if self.mlp == "swiglu" else h) + d)  # o; up(s); down
        biases += (b or self.qkv_bias) * (self.q_dim + 2 * kv)  # q; k, v
        qk_norms = 2 * self.head_dim if self.qk_norm else 0
        total = self._matmul_weights() + self.n_layer * (2 * norm + biases + qk_norms) + norm  # + final norm
        if self.tie_embeddings:  # lm_head *is* tok_emb: count that matrix once, as the table below
            total -= self.vocab_size * d
        if not exclude_embeddings:
            total += self.vocab_size * d + (self.seq_len * d if self.positions == "learned" else 0)
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in PaLM appendix B / nanoGPT's estimate_mfu.

        A matmul weight costs a multiply and an add per token forward (2 FLOPs); backward costs twice
        that (grads w.r.t. input and w.r.t. weight): 6 per weight. lm_head counts even when tied (the
        lookup is free, the output matmul is not); biases, norms, softmax and lookups are ignored.
        Attention adds per layer and token q.k^T against T keys (2*T*d) and probs@v (2*T*d), with
        d = n_head*head_dim whatever the GQA grouping; x3 for fwd+bwd gives 12*T*d. Like PaLM we do
        not halve it for the causal mask. A sliding window caps the keys a query sees at its width.
        """
        t = self.seq_len if seq_len is None else seq_len
        t = min(t, self.sliding_window or t)
        return 6 * self._matmul_weights() + 12 * self.n_layer * self.q_dim * t

    def step_flops(self, positions: float, attention: float, logits: float, frozen: bool = False) -> float:
        """Training FLOPs of what a step really computed (as flops_per_token, per position):
        `positions` through the blocks, `attention` query-key pairs (the sum of each sequence's
        length squared), `logits` rows through the head. Frozen weights (an adapter's base) need
        no weight gradient: 4 FLOPs a weight and position, not 6; attention keeps its backward
        (uncapped by a sliding window: an upper bound there)."""
        per_weight = 4 if frozen else 6
        head = self.vocab_size * self.n_embd
        return per_weight * ((self._matmul_weights() - head) * positions + head * logits) \
            + 12 * self.n_layer * self.q_dim * attention

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        fields = dataclasses.fields(cls)
        unknown = sorted(set(d) - {f.name for f in fields})
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        _check(not unknown and not missing, f"bad config dict: unknown keys {unknown}, missing keys {missing}")
        if "family" not in d:  # written before families: the preset's
            d = d | {"family": "gpt2" if d.get("norm") == "layernorm" else "llama"}
        return cls(**d)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without centering or bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if hasattr(F, "rms_norm"):  # fused, torch >= 2.4
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.head_dim = layer, cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.n_embd, cfg.q_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:  # one weight per head dimension, shared by all heads
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache: KVCache | None, docs: DocLayout | torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        S = k.shape[2]  # keys visible to these T queries: cached + new
        dropout = self.dropout if self.training else 0.0
        if isinstance(docs, DocLayout):  # packed documents (training, or a batch's prefill)
            y = attention.packed(q, k, v, docs, window=self.window, dropout=dropout)
        elif S == T and docs is None:  # training or prefill of one document a row
            y = attention.causal(q, k, v, window=self.window, dropout=dropout)
        else:  # decoding on a cache: a [T, S] mask, S the keys so far
            mask = attention.windowed(attention.cached_mask(T, S, docs, x.device), T, S, self.window, x.device)
            y = attention.sdpa(q, k, v, mask=mask, dropout=dropout)
        return self.resid_drop(self.o_proj(y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)))


class MLP(nn.Module):
    """swiglu: w2(silu(w1(x)) * w3(x)) (Shazeer 2020; LLaMA's names: w1 gate, w3 up, w2 down), its
    backward keeping w1(x) and w3(x) alone (swiglu.py) unless an adapter wraps w2. gelu:
    c_proj(gelu(c_fc(x))), GELU's tanh approximation as GPT-2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu, d, h, b = cfg.mlp == "swiglu", cfg.n_embd, cfg.hidden, cfg.bias
        if self.swiglu:
            self.w1, self.w3, self.w2 = nn.Linear(d, h, bias=b), nn.Linear(d, h, bias=b), nn.Linear(h, d, bias=b)
        else:
            self.c_fc, self.c_proj = nn.Linear(d, h, bias=b), nn.Linear(h, d, bias=b)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if not self.swiglu:
            return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))
        a, b = self.w1(x), self.w3(x)
        return self.drop(swiglu_down(a, b, self.w2.weight, self.w2.bias) if type(self.w2) is nn.Linear
                         else self.w2(F.silu(a) * b))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). A checkpointed block keeps
    its input (and its MLP's output) for backward and runs its forward again there (recompute.py)."""
    checkpointed = False

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)
        self.down = (cfg.hidden, cfg.n_embd)  # the down projection's weight as its matmul takes it

    def forward(self, x, rope, cache, docs=None):
        if self.checkpointed and torch.is_grad_enabled():
            return recomputed(self._forward, x, rope, cache, docs, down=self.down)
        return self._forward(x, rope, cache, docs)

    def _forward(self, x, rope, cache, docs):
        x = x + self.attn(self.attn_norm(x), rope, cache, docs)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.seq_len, cfg.n_embd)
        else:  # derived from the config, so not in state_dict. model.to(bfloat16) would round them
            cos, sin = rope_tables(cfg)  # too; autocast leaves buffers in fp32.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one Parameter, two names (Press & Wolf 2017); parameters() yields
            self.lm_head.weight = self.tok_emb.weight  # it once, state_dict() under both keys.
        # GPT-2 init: N(0, init_std) for every matrix, zero biases, norms keep their ones. Each block
        # adds two residual branches, so the residual stream's variance grows with 2*n_layer; GPT-2
        # scales the branches' output projections by 1/sqrt(2*n_layer) to offset it. Module order
        # is fixed, so the result is deterministic given torch.manual_seed.
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                scale = math.sqrt(2 * cfg.n_layer) if name.endswith(("o_proj", "w2", "c_proj")) else 1.0
                nn.init.normal_(m.weight, mean=0.0, std=cfg.init_std / scale)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, docs: DocLayout | torch.Tensor | None = None,
                keep: Kept | torch.Tensor | None = None, targets: torch.Tensor | None = None,
                temperature: float = 1.0, summed: bool = False) -> torch.Tensor:
        """idx [B, T] token ids -> logits [B, T, vocab]. With a cache, idx continues what it holds.

        keep (a Kept, or [B, T] bool): logits only there, as [N, vocab]. Fine-tuning learns a
        fraction of the tokens; the vocab-wide head and softmax on the rest would be wasted.

        targets [B, T] ids: instead of logits, the log-probability of each target under
        softmax(logits / temperature), [B, T] (with keep: [N]), computed a chunk of rows at a
        time so the logits never exist whole (loss.py). Training and evals take this path. With
        summed, their sum (a scalar), whose gradient the head finds in its one pass (loss.py).

        docs (packed training sequences): which document each token belongs to, as [B, T]
        non-decreasing ids or as the DocLayout made from them on the host. Attention stays inside
        a document and positions restart at 0 with each one, so a packed document is computed
        exactly as it would be alone. With a cache, docs covers every position so far [B,
        cache.pos + T]: left-padded prompts generate as a batch (padding is document 0, the text
        document 1).
        """
        keep, x = None if keep is None else Kept.of(keep), self.hidden_states(idx, cache, docs)
        x = self.norm(x if keep is None else keep.take(x))
        if targets is None:
            return self.lm_head(x)
        chosen = targets if keep is None else keep.take(targets)
        logp = (summed_logprob if summed else target_logprobs)(
            x.flatten(0, -2), self.lm_head.weight, chosen.flatten(), temperature)
        return logp if summed else logp.view(chosen.shape)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      docs: DocLayout | torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, n_embd]: the residual stream after the last block, before the final norm."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds seq_len {self.config.seq_len}")
        if isinstance(docs, torch.Tensor) and docs.shape[1] == T:  # no cache before: one host copy
            docs = DocLayout.from_docs(docs).to(idx.device)
        if isinstance(docs, DocLayout):
            pos = docs.positions
        elif docs is not None:  # decoding: the new tokens' offsets from their document's start
            pos = torch.arange(docs.shape[1], device=idx.device).expand(B, -1)
            first = torch.ones_like(docs, dtype=torch.bool)
            first[:, 1:] = docs[:, 1:] != docs[:, :-1]
            pos = (pos - torch.where(first, pos, 0).cummax(dim=1).values)[:, -T:]
        else:
            pos = torch.arange(start, start + T, device=idx.device)
        x, rope = self.tok_emb(idx), None
        if self.config.positions == "learned":
            x = x + self.pos_emb(pos)
        elif docs is not None:  # [B, 1, T, head_dim]: broadcast over heads
            rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache, docs)
        if cache is not None:
            cache.pos += T
        return x

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 stop_ids: Collection[int] = (), vocab_limit: int | None = None) -> Iterator[int]:
        """Yield up to max_new_tokens sampled ids, one at a time, continuing the prompt idx [1, T].
        Only ids below vocab_limit are drawn (a vocab padded past its tokenizer's has rows no
        text decodes to). Call model.eval() first (dropout is left as is). temperature 0 is
        greedy. Stops right after yielding a token in stop_ids. The prompt is prefilled once into
        a KV cache, then each step feeds one token. When the cache is full (seq_len positions) the
        window is cropped to its last seq_len//2 tokens and re-prefilled from position 0: one
        recompute per seq_len//2 steps, exact for rope and learned positions alike."""
        if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
            raise ValueError(f"generate expects a non-empty prompt of shape [1, T], got {tuple(idx.shape)}")
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need temperature >= 0 and top_k >= 1, got {temperature}, {top_k}")
        seq_len, n_layer = self.config.seq_len, self.config.n_layer
        window = idx[:, -seq_len:]  # an over-long prompt keeps its most recent seq_len tokens
        cache = KVCache(n_layer, seq_len)
        logits = self(window, cache, keep=Kept.last(window))  # [1, vocab]: the last position's alone
        for step in range(max_new_tokens):
            token = _sample(logits[0, :vocab_limit], temperature, top_k, generator)
            yield token
            if token in stop_ids or step == max_new_tokens - 1:
                return
            new = torch.tensor([[token]], dtype=idx.dtype, device=idx.device)
            window = torch.cat([window, new], dim=1)
            if cache.pos < seq_len:
                logits = self(new, cache)[:, -1]
            else:
                window, cache = window[:, -max(1, seq_len // 2):], KVCache(n_layer, seq_len)
                logits = self(window, cache, keep=Kept.last(window))


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> int:
    """One id from [vocab] logits: argmax at temperature 0, else softmax(logits / T) over the top_k."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))
