"""Jinja chat templates: a model folder's own (`chat_template` in tokenizer_config.json, or
chat_template.jinja), and the named built-ins `chatml` and `llama3` for models trained here.

A template is rendered in jinja2's sandbox, as transformers renders it, so one from a downloaded
folder can run no code. What is learned comes from the rendering itself: each message's content
is first replaced by a marker, which shows where the template puts it; the text around the
markers is the template's own. sft learns each assistant turn's content plus the template's
text after it up to and including its first special token: the end of turn (<|im_end|>,
<|eot_id|>, </s>, ...), so the model learns to end its turn there, and generation stops there.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

from ..errors import TokenizerError
from .chat import Segment, TokenLevel

CHATML = ("{%- for message in messages -%}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
          "{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
LLAMA3 = ("{{- bos_token -}}"
          "{%- for message in messages -%}"
          "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
          " + '<|eot_id|>' -}}"
          "{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}")
NAMED = {
    "chatml": {"jinja": CHATML, "specials": ["<|im_start|>", "<|im_end|>"], "variables": {}},
    "llama3": {"jinja": LLAMA3, "specials": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                              "<|eot_id|>"], "variables": {"bos_token": "<|begin_of_text|>"}},
}
_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters: never in a template's own text
_THINK = re.compile(r"<think>(.*?)</think>", re.S)  # reasoning as templates write it (Qwen3, DeepSeek-R1)
# Conversations that show where a template puts each part, and what ends an assistant turn.
_PROBES = ([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}],)


class TemplateError(TokenizerError):
    pass


def _environment():
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' {% generation %}...{% endgeneration %}: what an assistant writes, for its
        return_assistant_tokens_mask. llmforge finds the assistant's turns itself: the body renders as is."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise TemplateError(str(message))

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)

    # What transformers gives templates: trim_blocks/lstrip_blocks, loop controls, raise_exception,
    # a tojson that keeps non-ASCII. No strftime_now: a template's date line stays its default, so
    # the same data always renders the same ids.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    return env


class JinjaTemplate(TokenLevel):
    """A Jinja chat template with the special tokens of the tokenizer it renders for."""

    def __init__(self, source: str, specials: list[str], variables: dict | None = None,
                 stops: list[str] | None = None, origin: str = "chat_template", name: str | None = None):
        self.source, self.specials, self.variables = source, list(specials), dict(variables or {})
        self.extra_stops, self.origin, self.name = list(stops or []), origin, name
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")") \
            if self.specials else None
        try:
            self._template = _environment().from_string(source)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise TemplateError(f"{origin}: the chat template does not parse ({type(e).__name__}: {e})",
                                hint="fix the template, or use a named one (chat_template: chatml, llama3 or default)")

    @classmethod
    def from_spec(cls, fields: dict, base_dir: Path | None = None) -> JinjaTemplate:
        if "jinja" in fields:  # as to_dict wrote it
            return cls(fields["jinja"], fields["specials"], fields.get("variables"), fields.get("stops"),
                       fields.get("origin", "chat_template"), fields.get("name"))
        if "name" in fields:
            named = NAMED[fields["name"]]
            return cls(named["jinja"], named["specials"], named["variables"], origin=f"chat_template {fields['name']}",
                       name=fields["name"])
        return read_folder_template(Path(base_dir or ".") / fields["path"])

    def __reduce__(self):  # to tokenizing worker processes: rebuilt from its source (a compiled template
        return JinjaTemplate.from_spec, (self.to_dict(),)  # does not pickle)

    def to_dict(self) -> dict:
        return {"jinja": self.source, "specials": self.specials, "variables": self.variables,
                "stops": self.extra_stops, "origin": self.origin, "name": self.name}

    @property
    def symbols(self) -> tuple[str, ...]:
        """The special tokens a tokenizer trained for this template gets."""
        return tuple(self.specials)

    def jinja(self) -> str:
        return self.source

    # --- rendering --------------------------------------------------------------------------------

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **({"tools": tools} if tools else {}), **self.variables)
        except TemplateError as e:
            raise TemplateError(f"{self.origin}: the chat template refused a conversation: {e.message}",
                                hint="check the conversation's roles and order") from None
        except Exception as e:
            raise TemplateError(f"{self.origin}: the chat template raised {type(e).__name__}: {e}",
                                hint="use a named template instead (chat_template: chatml, llama3 or default)") from None

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        """The template's text for a conversation, as transformers' apply_chat_template(tokenize=False)."""
        return self._render(messages, add_generation_prompt, tools)

    def encode_text(self, tokenizer, text: str) -> list[int]:
        """Ids of rendered text, its special tokens matched (context: nothing in it is learned)."""
        return self.encode(tokenizer, [(p, special, False) for p, special in self._text_segments(text)])[0]

    def _parts(self, messages: list[dict], add_generation_prompt: bool, tools: list | None) -> list[tuple[str, int | None]]:
        """The rendering as (text, None) for the template's own text and (content, i) for
        message i's content, in the order the template writes them. Tool calls, tool lists and
        reasoning are the template's text here (it writes them as it likes: JSON, tags)."""
        # An empty content stays empty (templates test it); a tool's result is the template's to format
        # (Llama 3.1 writes it as JSON), and never learned.
        marked = [dict(m, content=f"\ue000{i}\ue001") if m["role"] != "tool" and m.get("content") else m
                  for i, m in enumerate(messages)]
        pieces = _MARK.split(self._render(marked, add_generation_prompt, tools))
        order = [int(i) for i in pieces[1::2]]
        real = self._render(messages, add_generation_prompt, tools)
        for strip in (False, True):  # templates may trim contents (Llama 3's `| trim`)
            contents = [messages[i]["content"].strip() if strip else messages[i]["content"] for i in order]
            rebuilt = [x for pair in zip(pieces[::2], contents + [""]) for x in pair]
            if "".join(rebuilt) == real and len(set(order)) == len(order):
                break
        else:
            raise TemplateError(f"{self.origin}: llmforge cannot tell which text of the rendering is each message's "
                                "content (the template changes it, or writes it more than once)",
                                hint="use a named template instead (chat_template: chatml, llama3 or default)")
        out = []
        for text, content, i in zip(pieces[::2], contents + [None], order + [None]):
            out += [(text, None)] if text else []
            out += [(content, i)] if i is not None else []
        return out

    def _text_segments(self, text: str) -> list[tuple[str, bool]]:
        pieces = self._split.split(text) if self._split else [text]
        return [(p, k % 2 == 1) for k, p in enumerate(pieces) if p]

    def _segments(self, messages: list[dict], learn: set[int], train_on: str, generation: bool) -> list[Segment]:
        """The rendering as segments. A learned assistant turn is all the template writes for it
        (its reasoning and tool calls too) after the generation prompt before it, through the first
        end of turn after its content: found by rendering the conversation up to it with the
        generation prompt, which the whole rendering must continue (as a model generating it would)."""
        tools = getattr(messages, "tools", None)
        parts = self._parts(messages, generation, tools)
        real, at, where = "".join(t for t, _ in parts), 0, {}
        for text, i in parts:
            where[i] = (at, at + len(text)) if i is not None else None
            at += len(text)
        spans = [self._turn(messages, i, real, where.get(i), tools) for i in sorted(learn)]
        if not getattr(messages, "learn_reasoning", True):
            spans = [piece for lo, hi in spans for piece in _without_reasoning(real, lo, hi)]
        cuts = sorted({0, len(real), *(x for span in spans for x in span)})
        inside = lambda a: train_on == "all" or any(lo <= a < hi for lo, hi in spans)  # noqa: E731
        out: list[Segment] = []
        at = 0
        for text, i in parts:
            for a, b in zip([at] + [c for c in cuts if at < c < at + len(text)],
                            [c for c in cuts if at < c < at + len(text)] + [at + len(text)]):
                piece = real[a:b]
                out += [(piece, False, inside(a))] if i is not None else \
                    [(p, special, inside(a)) for p, special in self._text_segments(piece)]
            at += len(text)
        return out

    def _turn(self, messages: list[dict], i: int, real: str, content: tuple | None, tools) -> tuple[int, int]:
        """Where assistant message i's turn is in the whole rendering `real`: [start, end)."""
        head = self._render(list(messages[:i]), True, tools)
        if not real.startswith(head):
            raise TemplateError(f"{self.origin}: cannot find where assistant message {i}'s turn starts (the template "
                                "renders the conversation before it differently once the conversation goes on)",
                                hint="use a named template instead (chat_template: chatml, llama3 or default)")
        after = max(len(head), content[1] if content else 0)
        reasoning = messages[i].get("reasoning_content", "").strip()
        if reasoning and reasoning not in self._render(list(messages[:i + 1]), False, tools):
            raise TemplateError(f"{self.origin}: the chat template does not write reasoning_content (assistant "
                                f"message {i}'s)", hint="use a template that renders it (a Qwen3 or DeepSeek-R1 "
                                "folder's), or put the reasoning in the content as <think>...</think>")
        ends = [k + len(stop) for stop in self._turn_ends for k in [real.find(stop, after)] if k >= 0]
        if not ends:
            raise TemplateError(f"{self.origin}: cannot find the assistant's turns in the rendering (no special token "
                                f"ends assistant message {i}'s turn)",
                                hint="use a named template instead (chat_template: chatml, llama3 or default)")
        for call in messages[i].get("tool_calls") or []:
            name = call["function"]["name"]
            if name not in real[len(head):min(ends)]:
                raise TemplateError(f"{self.origin}: the chat template does not write tool calls (assistant message "
                                    f"{i} calls {name!r}, which its turn does not show)",
                                    hint="use the model's own template if it takes tools, or data without tool calls")
        return len(head), min(ends)

    @cached_property
    def _turn_ends(self) -> tuple[str, ...]:
        return (self.end_of_turn, *[s for s in self.extra_stops if s in self.specials])

    def segments(self, messages: list[dict], train_on: str = "assistant") -> list[Segment]:
        learn = {i for i, m in enumerate(messages) if m["role"] == "assistant"}
        return self._segments(messages, learn, train_on, False)

    def prompt_segments(self, messages: list[dict]) -> list[Segment]:
        return self._segments(messages, set(), "assistant", True)

    def pair_segments(self, prompt: list[dict], reply: str) -> list[Segment]:
        """A preference pair's side: the whole conversation, only the final reply learned."""
        return self._segments(prompt + [{"role": "assistant", "content": reply}], {len(prompt)}, "assistant", False)

    @cached_property
    def end_of_turn(self) -> str:
        """The special token that ends an assistant turn: the first the template writes after an
        assistant message's content (checks the template on the way)."""
        parts = self._parts(list(_PROBES[0]), False, None)
        after = next((k for k, (_, i) in enumerate(parts) if i == 1), None)
        for text, i in parts[after + 1:] if after is not None else []:
            if i is not None:
                break
            special = next((p for p, is_special in self._text_segments(text) if is_special), None)
            if special:
                return special
        why = "it does not write assistant message 1's content" if after is None else \
            "no special token ends an assistant turn"
        raise TemplateError(f"{self.origin}: cannot find the assistant's turns in the rendering ({why})",
                            hint="use a named template instead (chat_template: chatml, llama3 or default)")

    def check(self) -> None:
        """Raise a TemplateError naming the template if llmforge cannot follow it."""
        self.end_of_turn  # noqa: B018 - renders the probes
        self.prompt_segments(_PROBES[0][:1])

    # --- token level (with TokenLevel's encode, render, prompt) -------------------------------------

    def stop_ids(self, tokenizer) -> tuple[int, ...]:
        """The end of turn, the generation config's eos tokens, and end-of-text."""
        ids = [tokenizer.special_id(self.end_of_turn)] + [tokenizer.special_id(s) for s in self.extra_stops
                                                           if s in tokenizer.specials]
        return tuple(dict.fromkeys(ids + [tokenizer.eot_id]))


def _without_reasoning(real: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """A learned turn [lo, hi) less the text of its <think>...</think> reasoning (the tags stay
    learned: the model still opens and closes its thoughts)."""
    out, at = [], lo
    for m in _THINK.finditer(real, lo, hi):
        out.append((at, m.start(1)))
        at = m.end(1)
    return [(a, b) for a, b in out + [(at, hi)] if a < b]


def read_folder_template(path: Path) -> JinjaTemplate:
    """A model folder's own template (chat_template.jinja, or tokenizer_config.json's
    chat_template), with its tokenizer's special tokens and its generation config's eos."""
    folder = path if path.is_dir() else path.parent
    try:
        return _read_folder_template(path, folder)
    except (TypeError, KeyError, AttributeError) as e:  # JSON of another shape than transformers writes
        raise TemplateError(f"{folder}: its tokenizer files are not shaped as transformers writes them "
                            f"({type(e).__name__}: {e})", hint="name a template: tokenizer.chat_template: chatml, "
                                                               "llama3 or default") from None


def _read_folder_template(path: Path, folder: Path) -> JinjaTemplate:
    config = _json(folder / "tokenizer_config.json")
    if path.suffix == ".jinja" or (path.is_dir() and (path / "chat_template.jinja").is_file()):
        file = path if path.suffix == ".jinja" else path / "chat_template.jinja"
        source, origin = file.read_text(), str(file)
    else:
        source, origin = config.get("chat_template"), f"{folder / 'tokenizer_config.json'}: chat_template"
        if isinstance(source, list):  # several named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            raise TemplateError(f"{folder}: the model has no chat template (no chat_template.jinja, no chat_template "
                                "in tokenizer_config.json)", hint="name one: tokenizer.chat_template: chatml, llama3 "
                                                                  "or default")
    added = _json(folder / "tokenizer.json").get("added_tokens", [])  # read once: it can be megabytes
    specials = [t["content"] for t in added if t.get("special")]
    variables = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            variables[key] = value
    eos = _json(folder / "generation_config.json").get("eos_token_id")
    vocab = {t["id"]: t["content"] for t in added}
    stops = [vocab[i] for i in (eos if isinstance(eos, list) else [eos]) if i in vocab]
    template = JinjaTemplate(source, specials, variables, stops, origin)
    template.check()
    return template


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TemplateError(f"{path}: cannot read it ({e})") from None
    if not isinstance(value, dict):
        raise TemplateError(f"{path}: not a JSON object")
    return value
