"""The chat template: a conversation -> token ids + the mask of tokens the model learns.

This is the one implementation: sft and dpo data preparation, `llmforge chat`, `sample --chat`,
`eval` and the mask preview in `plan` all render through it, so the model is always prompted
exactly as it was trained. A conversation renders as

    <|system|>You are terse.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>

with each tag a single special token (a sentencepiece user-defined symbol, so it is never split
or produced from ordinary text pieces). Learned tokens under train_on "assistant": the content of
each assistant turn and its closing <|end|> (so the model learns to end its turn); the tag that
opens the turn is part of the prompt. Under "all": every token after the first.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

from ..errors import TokenizerError

ROLES = ("system", "user", "assistant")
# (text, is a special token, learned)
Segment = tuple[str, bool, bool]


class TokenLevel:
    """What every template does with the segments it renders: ids and learned flags."""

    def encode(self, tokenizer, segments: list[Segment]) -> tuple[list[int], list[bool]]:
        return encode_segments(tokenizer, segments)

    def render(self, tokenizer, messages: list[dict], train_on: str = "assistant") -> tuple[list[int], list[bool]]:
        return self.encode(tokenizer, self.segments(messages, train_on))

    def prompt(self, tokenizer, messages: list[dict]) -> list[int]:
        return self.encode(tokenizer, self.prompt_segments(messages))[0]


@dataclass(frozen=True)
class ChatTemplate(TokenLevel):
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"

    @property
    def symbols(self) -> tuple[str, str, str, str]:
        """The special tokens, in the order they are added to the tokenizer."""
        return (self.system, self.user, self.assistant, self.end)

    def to_dict(self) -> dict:
        return {"system": self.system, "user": self.user, "assistant": self.assistant, "end": self.end}

    # --- text level: what `plan` previews, and what `encode` turns into ids --------------------------

    def segments(self, messages: list[dict], train_on: str = "assistant") -> list[Segment]:
        """A whole conversation (records are validated by the data readers: roles in order, text).
        A reply's <think>...</think> reasoning is learned with it unless the conversation says not."""
        _refuse_tools(messages)
        reasoning = getattr(messages, "learn_reasoning", True)
        out: list[Segment] = []
        for m in messages:
            learned = train_on == "all" or m["role"] == "assistant"
            content = [(m["content"], False, learned)]
            if learned and not reasoning and train_on != "all":
                content = [(piece, False, k % 2 == 0) for k, piece in enumerate(_THINK.split(m["content"])) if piece]
            out += [(getattr(self, m["role"]), True, train_on == "all" and bool(out)), *content,
                    (self.end, True, learned)]
        return out

    def prompt_segments(self, messages: list[dict]) -> list[Segment]:
        """The conversation so far, then the tag that opens the assistant's turn: what the model
        continues at generation time (and the shared prefix of a preference pair)."""
        return [(t, special, False) for t, special, _ in self.segments(messages)] + [(self.assistant, True, False)]

    def pair_segments(self, prompt: list[dict], reply: str) -> list[Segment]:
        """A preference pair's side: the prompt, then the reply's content and closing tag, learned."""
        return self.prompt_segments(prompt) + [(reply, False, True), (self.end, True, True)]

    def jinja(self) -> str:
        """The same rendering as a Jinja chat template (Hugging Face's `chat_template`): each
        message as tag + content + end, then with add_generation_prompt the assistant's tag."""
        tags = "{" + ", ".join(f"{json.dumps(r)}: {json.dumps(getattr(self, r))}" for r in ROLES) + "}"
        return ("{%- set tags = " + tags + " -%}"
                "{%- for message in messages -%}"
                "{%- if message['role'] not in tags -%}"
                "{{ raise_exception('unknown role: ' + message['role']) }}"
                "{%- endif -%}"
                "{{ tags[message['role']] + message['content'] + " + json.dumps(self.end) + " }}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{ " + json.dumps(self.assistant) + " }}{%- endif -%}")

    # --- token level (with TokenLevel's encode, render, prompt) -------------------------------------

    def stop_ids(self, tokenizer) -> tuple[int, ...]:
        """Where generation ends: the turn's end tag, or end-of-text."""
        return tokenizer.special_id(self.end), tokenizer.eot_id


_THINK = re.compile(r"(?<=<think>)(.*?)(?=</think>)", re.S)  # the reasoning between the tags


def _refuse_tools(messages: list[dict]) -> None:
    """The tag template has no place for tools, their calls and results, or separate reasoning."""
    what = ("tools" if getattr(messages, "tools", None) else
            next((f"message {i}'s {k}" for i, m in enumerate(messages) for k in ("tool_calls", "reasoning_content")
                  if m.get(k)), None) or
            next((f"message {i}, a tool result" for i, m in enumerate(messages) if m["role"] == "tool"), None))
    if what:
        raise TokenizerError(f"the tag chat template (<|user|>...) cannot render {what}",
                             hint="use a template that renders them: the model folder's own (a Qwen2.5, Qwen3 or "
                                  "Llama 3.1 folder's), or data without them (reasoning can be <think>...</think> in "
                                  "the content)")


def encode_segments(tokenizer, segments: list[Segment]) -> tuple[list[int], list[bool]]:
    """(ids, learned) with one flag per id: whether that id is a training target.

    A tokenizer.json tokenizer encodes the whole rendering at once, as transformers'
    apply_chat_template does (its ids are theirs), and a token is learned if any of its characters
    is: a reply's first word often starts with the template's space before it. Otherwise text
    between special tokens is encoded as one piece, except where the learned flag changes: a reply
    is encoded apart from the prompt before it, as it is when generated after that prompt."""
    if hasattr(tokenizer, "encode_offsets") and (whole := _encode_whole(tokenizer, segments)) is not None:
        return whole
    ids: list[int] = []
    learned: list[bool] = []
    for (special, learn), group in itertools.groupby(segments, key=lambda s: (s[1], s[2])):
        texts = [text for text, _, _ in group]
        pieces = [[tokenizer.special_id(t)] for t in texts] if special else [tokenizer.encode("".join(texts))]
        for piece in pieces:
            ids += piece
            learned += [learn] * len(piece)
    return ids, learned


def _encode_whole(tokenizer, segments: list[Segment]) -> tuple[list[int], list[bool]] | None:
    """The whole rendering in one encode with special tokens matched; None if that finds special
    tokens anywhere but where the template put them (a message spelled one: it stays text)."""
    text = "".join(t for t, _, _ in segments)
    flags, where, at = bytearray(len(text) + 1), [], 0
    for t, special, learn in segments:
        if learn:
            flags[at:at + len(t)] = b"\1" * len(t)
        if special:
            where.append((at, at + len(t)))
        at += len(t)
    ids, offsets = tokenizer.encode_offsets(text)
    specials = set(tokenizer.specials.values())
    if [tuple(o) for i, o in zip(ids, offsets) if i in specials] != where:
        return None
    return ids, [any(flags[a:max(b, a + 1)]) for a, b in offsets]


