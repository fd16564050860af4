"""Rolling out multi-turn conversations with an environment (environments.py), all of a step's
at once: each turn, every conversation still going is continued in one batched, KV-cached
generation (model/generate.py); then each reply's tool calls are run and the tool turns appended.

What a conversation's row holds is what the model's template renders: the prompt rendered with the
environment's tools and the generation prompt, then per turn the policy's own sampled tokens
(learned) and the template's text up to the next generation prompt (the end of the turn, the tool
turn: context, not learned). The policy's turns are kept as the text it wrote (tool calls
included), so apply_chat_template(messages, tools=...) of the episode's messages renders the same
text. A template that renders an earlier turn differently once the conversation goes on (Qwen3
drops old reasoning) ends the conversation there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.generate import generate_batch
from ..text.toolcalls import ToolCallFormat
from .environments import Episode, Found, call_tool


@dataclass
class Conversation:
    ids: list  # every token so far
    policy: list  # per token: the policy sampled it
    logps: list  # per token: the sampler's log-probability (0 for context)
    text: str  # the rendering the ids stand for
    episode: Episode
    live: bool = True
    reply: str = ""  # the policy's last turn
    ended: bool = False  # it closed its last turn
    tokens: int = 0  # the policy's tokens, all turns
    turns: int = 0  # the policy's turns
    extra: dict = field(default_factory=dict)


def start(template, tokenizer, found: Found, messages: list, record: dict, options: dict, seed: int) -> Conversation:
    text = template.render_text(list(messages), True, found.env.tools)
    ids = template.encode_text(tokenizer, text)
    return Conversation(ids, [False] * len(ids), [0.0] * len(ids), text,
                        Episode(record=record, messages=list(messages), options=dict(options), seed=seed))


def roll(model, conversations: list[Conversation], *, template, tokenizer, found: Found, fmt: ToolCallFormat,
         seq_len: int, max_turns: int, max_new_tokens: int, temperature: float, top_k, generator,
         stop_ids: tuple[int, ...]) -> None:
    """Every conversation through its turns (in place)."""
    device = next(model.parameters()).device
    for c in conversations:  # a prompt the tools made too long for seq_len ends before it starts: an empty row
        c.live = len(c.ids) < seq_len
        c.extra["too_long"] = not c.live
    for turn in range(max_turns):
        live = [c for c in conversations if c.live]
        if not live:
            return
        longest = max(len(c.ids) for c in live)
        prompts = torch.zeros(len(live), longest, dtype=torch.long)
        for row, c in enumerate(live):
            prompts[row, :len(c.ids)] = torch.tensor(c.ids)
        # One KV cache holds the turn: its longest conversation's room bounds every reply of the turn.
        got = generate_batch(model, prompts.to(device), torch.tensor([len(c.ids) for c in live], device=device),
                             min(max_new_tokens, seq_len - longest),
                             temperature=temperature, top_k=top_k, generator=generator, stop_ids=stop_ids,
                             vocab_limit=tokenizer.vocab_size)
        new, logps = got["new"].tolist(), got["logps"].tolist()
        for row, c in enumerate(live):
            n = int(got["n"][row])
            take(c, new[row][:n], logps[row][:n], bool(got["ended"][row]), tokenizer, stop_ids)
            if c.live and turn < max_turns - 1:
                act(c, template, tokenizer, found, fmt, seq_len)
            else:
                c.live = False


def take(c: Conversation, ids: list, logps: list, ended: bool, tokenizer, stop_ids) -> None:
    """The policy's reply, appended as learned tokens."""
    c.ids += ids
    c.policy += [True] * len(ids)
    c.logps += logps
    c.tokens += len(ids)
    c.turns += 1
    c.reply = tokenizer.decode([t for t in ids if t not in stop_ids])
    c.ended = ended
    c.episode.messages.append({"role": "assistant", "content": c.reply})
    c.live = ended  # cut off by max_new_tokens or seq_len: the conversation is over


def act(c: Conversation, template, tokenizer, found: Found, fmt: ToolCallFormat, seq_len: int) -> None:
    """Run the reply's tool calls and append their turns, as context; a reply without one ends the
    conversation (it is the answer). A call that does not parse is a failed turn: its error is the
    tool's result, so the policy sees it."""
    try:
        calls = fmt.parse(c.reply)
    except ValueError as e:
        c.episode.tool_errors += 1
        results = [("", f"error: {e}")]
    else:
        if not calls:
            c.live = False
            return
        c.episode.tool_calls += len(calls)
        results = [(name, call_tool(found, name, arguments, c.episode)) for name, arguments in calls]
    turns = [{"role": "tool", "name": name, "content": result} for name, result in results]
    head = c.text + c.reply
    whole = template.render_text(c.episode.messages + turns, True, found.env.tools)
    if not whole.startswith(head):  # the template rewrites what came before: no faithful continuation
        c.extra["rewritten"] = True
        c.live = False
        return
    context = template.encode_text(tokenizer, whole[len(head):])
    if context and c.ids and context[0] == c.ids[-1]:  # the end-of-turn token the policy sampled itself
        context = context[1:]
    if len(c.ids) + len(context) >= seq_len:  # no room for another turn
        c.live = False
        return
    c.ids += context
    c.policy += [False] * len(context)
    c.logps += [0.0] * len(context)
    c.text = whole
    c.episode.messages += turns


def rows(conversations: list[Conversation], seq_len: int) -> dict:
    """tokens [n, T+1] (right-padded), learned [n, T] (targets the policy sampled), sampled [n, T]
    (their sampler log-probs), length [n]."""
    n, T = len(conversations), seq_len
    tokens = np.zeros((n, T + 1), dtype=np.int64)
    learned = np.zeros((n, T), dtype=bool)
    sampled = np.zeros((n, T), dtype=np.float32)
    for i, c in enumerate(conversations):
        k = len(c.ids) if not c.extra.get("too_long") else 0
        tokens[i, :k] = c.ids[:k]
        learned[i, :k - 1] = c.policy[1:k]  # position j predicts token j+1
        sampled[i, :k - 1] = c.logps[1:k]
    return {"tokens": tokens, "learned": learned, "sampled": sampled,
            "length": np.array([0 if c.extra.get("too_long") else len(c.ids) for c in conversations], dtype=np.int64)}
