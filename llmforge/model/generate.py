"""Loading a trained stage and generating from it: plain continuation, or a chat reply."""

from __future__ import annotations

from typing import Iterator

import torch

from ..text.chat import ChatTemplate
from ..text.tokenizer import Tokenizer
from .kept import Kept
from .transformer import KVCache, Transformer
from .weights import run_eager


def sample(model: Transformer, tokenizer: Tokenizer, prompt: str, template: ChatTemplate | None = None,
           **options) -> Iterator[str]:
    """Stream the continuation of `prompt` as text pieces (complete UTF-8 characters only). It
    ends at end-of-text, or where a chat-trained model closes its turn (as an exported one does)."""
    stops = template.stop_ids(tokenizer) if template else (tokenizer.eot_id,)
    yield from stream(model, tokenizer, tokenizer.encode(prompt) or [tokenizer.eot_id], stops, **options)


def reply(model: Transformer, tokenizer: Tokenizer, template: ChatTemplate, messages: list[dict],
          **options) -> Iterator[str]:
    """Stream the assistant's next turn in a conversation, prompted through the chat template;
    it ends when the model closes its turn (or at max_new_tokens)."""
    ids = template.prompt(tokenizer, messages)
    yield from stream(model, tokenizer, ids, template.stop_ids(tokenizer), **options)


def stream(model: Transformer, tokenizer: Tokenizer, ids: list[int], stop_ids: tuple[int, ...], *,
           max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50, seed: int = 0,
           stopped: list | None = None) -> Iterator[str]:
    """Generated text after `ids`, piece by piece, until a stop id (not shown). If given, `stopped`
    gets True appended when a stop id ended the text (False when max_new_tokens did)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    new: list[int] = []
    shown, ended = "", False
    for token in model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                generator=generator, stop_ids=stop_ids, vocab_limit=tokenizer.vocab_size):
        if token in stop_ids:
            ended = True
            break
        new.append(token)
        text = tokenizer.decode(new)
        # Byte-fallback tokens can split a character; hold back until it is complete.
        if not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    rest = tokenizer.decode(new)[len(shown):]
    if stopped is not None:
        stopped.append(ended)
    if rest:
        yield rest


@torch.no_grad()
@run_eager
def generate_batch(model, prompts: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int, *,
                   temperature: float, top_k: int | None, generator: torch.Generator | None,
                   stop_ids: tuple[int, ...], vocab_limit: int) -> dict:
    """Sample a reply to each of B prompts at once with one KV cache: prompts [B, T] left-aligned,
    lengths [B]. They are moved flush right (left padding, its own document, so no real token
    attends to it and positions start at each prompt's first token), prefilled once, then each
    step feeds the B new tokens. A row stops at a stop id (kept as its last token) or after
    max_new_tokens; the batch stops when every row has. Returns new [B, L] ids (0 after a row's
    end), logps [B, L] (log-probability of each sampled id under softmax(logits / temperature),
    the distribution it was drawn from; at temperature 0, of logits), n [B] ids per row, ended [B]."""
    B, P = len(prompts), int(lengths.max())
    pad = P - lengths
    cols = torch.arange(P, device=prompts.device)
    idx = prompts.gather(1, (cols - pad[:, None]).clamp(min=0))  # each prompt moved flush right
    docs = (cols >= pad[:, None]).long()
    cache = KVCache(model.config.n_layer, P + max_new_tokens)
    logits = model(idx, cache, docs, keep=Kept.last(idx))[:, :vocab_limit]  # the prompts' last positions alone
    new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=prompts.device)
    logps = torch.zeros(B, max_new_tokens, device=prompts.device)
    n = torch.zeros(B, dtype=torch.long, device=prompts.device)
    live = torch.ones(B, dtype=torch.bool, device=prompts.device)
    stops = torch.tensor(stop_ids, device=prompts.device)
    for t in range(max_new_tokens):
        scaled = logits.float() / (temperature or 1.0)
        if top_k is not None and top_k < scaled.shape[-1]:
            scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[:, -1:], float("-inf"))
        logp = torch.log_softmax(scaled, dim=-1)
        token = logp.argmax(-1) if temperature == 0 else torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
        new[:, t] = torch.where(live, token, 0)
        logps[:, t] = torch.where(live, logp.gather(1, token[:, None])[:, 0], 0.0)
        n += live.long()
        live &= ~torch.isin(token, stops)
        if not live.any() or t == max_new_tokens - 1:
            break
        docs = torch.cat([docs, torch.ones(B, 1, dtype=torch.long, device=docs.device)], dim=1)
        logits = model(token[:, None], cache, docs)[:, -1, :vocab_limit]
    return {"new": new, "logps": logps, "n": n, "ended": ~live}


def greedy_replies(model, tokenizer: Tokenizer, template: ChatTemplate, conversations: list[list[dict]],
                   max_new_tokens: int, batch: int = 64) -> list[tuple[str, bool]]:
    """The greedy reply to each conversation and whether the model ended its turn, `batch` at a
    time through one KV cache each (generate_batch): what a task eval asks of a model."""
    device = next(model.parameters()).device
    stops = tuple(template.stop_ids(tokenizer))
    out, seq_len = [], model.config.seq_len
    for i in range(0, len(conversations), batch):
        # A prompt keeps its last seq_len - 1 tokens, and replies stop where the longest prompt
        # of the batch reaches seq_len (the model has no positions beyond it).
        ids = [template.prompt(tokenizer, messages)[-(seq_len - 1):] for messages in conversations[i:i + batch]]
        steps = min(max_new_tokens, seq_len - max(map(len, ids)))
        prompts = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        for row, x in enumerate(ids):
            prompts[row, :len(x)] = torch.tensor(x)
        got = generate_batch(model, prompts.to(device), torch.tensor([len(x) for x in ids], device=device),
                             steps, temperature=0.0, top_k=None, generator=None, stop_ids=stops,
                             vocab_limit=tokenizer.vocab_size)
        out += zip(reply_texts(tokenizer, got, stops), got["ended"].tolist())
    return out


def reply_texts(tokenizer: Tokenizer, got: dict, stop_ids: tuple[int, ...]) -> list[str]:
    """The text of each reply generate_batch returned, without the stop id that ended it."""
    return [tokenizer.decode([t for t in new[:n] if t not in stop_ids])
            for new, n in zip(got["new"].tolist(), got["n"].tolist())]

