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

import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
# (text, is a special token, learned)
Segment = tuple[str, bool, bool]


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"

    @classmethod
    def from_spec(cls, spec) -> ChatTemplate | None:
        """From the recipe's tokenizer.chat_template (a ChatTemplateSpec, a dict, or None)."""
        if spec is None:
            return None
        fields = spec if isinstance(spec, dict) else spec.model_dump()
        return cls(**fields)

    @property
    def symbols(self) -> tuple[str, str, str, str]:
        """The special tokens, in the order they are added to the tokenizer."""
        return (self.system, self.user, self.assistant, self.end)

    def to_dict(self) -> dict:
        return {"system": self.system, "user": self.user, "assistant": self.assistant, "end": self.end}

    # --- text level: what `plan` previews, and what `encode` turns into ids --------------------------

    def segments(self, messages: list[dict], train_on: str = "assistant") -> list[Segment]:
        """A whole conversation (records are validated by the data readers: roles in order, text)."""
        out: list[Segment] = []
        for m in messages:
            learned = train_on == "all" or m["role"] == "assistant"
            out += [(getattr(self, m["role"]), True, train_on == "all" and bool(out)),
                    (m["content"], False, learned), (self.end, True, learned)]
        return out

    def prompt_segments(self, messages: list[dict]) -> list[Segment]:
        """The conversation so far, then the tag that opens the assistant's turn: what the model
        continues at generation time (and the shared prefix of a preference pair)."""
        return [(t, special, False) for t, special, _ in self.segments(messages)] + [(self.assistant, True, False)]

    def reply_segments(self, text: str) -> list[Segment]:
        """An assistant turn's content and its closing tag, both learned (a dpo response)."""
        return [(text, False, True), (self.end, True, True)]

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

    # --- token level --------------------------------------------------------------------------------

    def encode(self, tokenizer, segments: list[Segment]) -> tuple[list[int], list[bool]]:
        """(ids, learned) with one flag per id: whether that id is a training target."""
        ids: list[int] = []
        learned: list[bool] = []
        for text, special, learn in segments:
            piece = [tokenizer.special_id(text)] if special else tokenizer.encode(text)
            ids += piece
            learned += [learn] * len(piece)
        return ids, learned

    def render(self, tokenizer, messages: list[dict], train_on: str = "assistant") -> tuple[list[int], list[bool]]:
        return self.encode(tokenizer, self.segments(messages, train_on))

    def prompt(self, tokenizer, messages: list[dict]) -> list[int]:
        return self.encode(tokenizer, self.prompt_segments(messages))[0]

    def stop_id(self, tokenizer) -> int:
        return tokenizer.special_id(self.end)
