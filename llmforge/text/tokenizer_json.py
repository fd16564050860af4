"""Tokenizers from a Hugging Face `tokenizer.json`, through the `tokenizers` library.

This is how the open models people fine-tune ship their tokenizer (SmolLM2, Llama 3, Qwen,
Mistral, Phi-3): byte-level BPE, or sentencepiece-style BPE with byte fallback. `JsonTokenizer`
has the interface and guarantees of the sentencepiece `Tokenizer`: encode adds no BOS/EOS, a
special token's spelling inside text encodes as plain text (so no data can forge a turn), and
each id has the bytes it stands for (bits per byte). `load_tokenizer` opens either kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import TokenizerError

JSON_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# What a pretraining document ends with, in the spellings models use (GPT-2/Qwen/SmolLM, Llama 3,
# sentencepiece-era models); else the tokenizer_config's eos_token.
_DOC_ENDS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_SUPPORTED = ("BPE", "Unigram")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte as a printable character (char -> byte). Printable
    Latin-1 bytes stand for themselves; the other 68 are shifted to 256 and up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(shifted)}


def _has_type(node, kind: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) has a step of this type."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_has_type(n, kind) for key in ("decoders", "pretokenizers", "normalizers") for n in node.get(key) or [])


class JsonTokenizer:
    """A loaded tokenizer.json (with its tokenizer_config.json when there is one)."""

    encodes_in_parallel = True  # encode_batch runs on every core (the library's Rust threads)

    def __init__(self, path: Path, data: bytes, config: dict | None = None):
        from tokenizers import Tokenizer as Backend

        try:
            spec = json.loads(data)
            kind = spec["model"].get("type") or ("BPE" if "merges" in spec["model"] else "Unigram")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TokenizerError(f"{path}: not a tokenizer.json ({type(e).__name__}: {e})",
                                 hint="point at the tokenizer.json of a Hugging Face model folder") from None
        if kind not in _SUPPORTED:
            raise TokenizerError(f"{path}: model.type {kind!r} is not supported (llmforge reads BPE and "
                                 "Unigram tokenizers, which can spell any text)",
                                 hint="use a model whose tokenizer is BPE (GPT-2, Llama 3, Qwen, Mistral) or Unigram")
        try:
            self._tok = Backend.from_str(data.decode())
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"{path}: the tokenizers library cannot load it ({e})") from None
        self._tok.encode_special_tokens = True  # special tokens come only from special_id, never from text
        self.path, self._data, self.config = path, data, config or {}
        self.kind = kind
        self.fingerprint = hashlib.sha256(data + json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        self.specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.byte_level = _has_type(spec.get("decoder"), "ByteLevel") or _has_type(spec.get("pre_tokenizer"), "ByteLevel")
        self._bytes = self._byte_table(added)
        self.token_bytes = np.fromiter(map(len, self._bytes), dtype=np.int32, count=self.vocab_size)
        self.token_bytes[list(self.specials.values())] = 0  # text bytes: special tokens stand for none
        self.eot_id = self._doc_end(path)
        self._threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def _byte_table(self, added: dict[str, int]) -> list[bytes]:
        """What each id decodes to, as bytes: byte-level pieces through GPT-2's alphabet; otherwise
        sentencepiece-style pieces ("<0x0A>" one byte, U+2581 a space)."""
        table = [b""] * self.vocab_size
        alphabet = _byte_alphabet()
        for piece, i in self._tok.get_vocab(with_added_tokens=False).items():
            if self.byte_level:
                table[i] = bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()
            elif m := _BYTE_PIECE.fullmatch(piece):
                table[i] = bytes([int(m[1], 16)])
            else:
                table[i] = piece.replace("\u2581", " ").encode()
        for piece, i in added.items():
            table[i] = piece.encode()
        return table

    def _doc_end(self, path: Path) -> int:
        eos = self.config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        for piece in (*_DOC_ENDS, eos):
            if piece in self.specials:
                return self.specials[piece]
        raise TokenizerError(f"{path}: no end-of-text token (none of {', '.join(_DOC_ENDS)}, and no eos_token "
                             f"in {CONFIG_FILE})", hint="use a tokenizer that defines an end-of-text token")

    @classmethod
    def load(cls, path: str | Path) -> JsonTokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
        config = None
        if (path.parent / CONFIG_FILE).is_file():
            try:
                config = json.loads((path.parent / CONFIG_FILE).read_text())
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{path.parent / CONFIG_FILE}: cannot read it ({e})") from None
        return cls(path, data, config)

    def __reduce__(self):  # picklable for data-loading worker processes
        return (JsonTokenizer, (self.path, self._data, self.config))

    def save(self, folder: Path) -> None:
        """Write tokenizer.json (+ tokenizer_config.json) into folder."""
        _write(folder / JSON_FILE, self._data)
        if self.config:
            _write(folder / CONFIG_FILE, json.dumps(self.config, indent=2, ensure_ascii=False).encode())

    @property
    def files(self) -> dict[str, bytes]:
        return {JSON_FILE: self._data} | (
            {CONFIG_FILE: json.dumps(self.config, indent=2, ensure_ascii=False).encode()} if self.config else {})

    def special_id(self, piece: str) -> int:
        if piece not in self.specials:
            known = ", ".join(self.specials) or "none"
            raise TokenizerError(f"{self.path}: the tokenizer has no special token {piece!r} (it has: {known})",
                                 hint="use the model's own chat template (leave tokenizer.chat_template out), "
                                      "or a named one whose tokens it has")
        return self.specials[piece]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids with special tokens matched in the text (a chat template's rendering), and each
        id's character span."""
        self._tok.encode_special_tokens = False
        try:
            enc = self._tok.encode(text, add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = True
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The library's own batch encoding runs on all cores (Rust threads).
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_to_bytes(self, texts: list[str], dtype: str) -> list[bytes]:
        return [np.asarray(ids, dtype=dtype).tobytes() for ids in self.encode_batch(texts)]

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {min(ids)}..{max(ids)}")
        if self.byte_level:  # exact bytes; "replace": generated ids may split a UTF-8 character
            return b"".join([self._bytes[i] for i in ids]).decode("utf-8", "replace")
        return self._tok.decode(ids, skip_special_tokens=False)


def train_bytelevel_bpe(documents: Iterable[str], out_dir: Path, *, vocab_size: int,
                        sample_bytes: int = 10_000_000, specials: tuple[str, ...] = ()) -> Path:
    """Train a byte-level BPE (the kind GPT-2, Llama 3 and Qwen use) on at most `sample_bytes` of
    `documents`, with <|endoftext|> and `specials` as special tokens; write out_dir/tokenizer.json."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    # GPT-2's split (words, numbers, punctuation, spaces) over bytes shown as printable characters:
    # any UTF-8 text round-trips, no normalizer changes it.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    symbols = ["<|endoftext|>", *[s for s in specials if s != "<|endoftext|>"]]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(symbols):
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs its 256 byte tokens "
                             f"and {len(symbols)} special tokens", hint=f"set tokenizer.vocab_size to at least "
                                                                        f"{len(alphabet) + len(symbols)}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=symbols, initial_alphabet=alphabet,
                                  show_progress=False)

    def sample():
        used = 0
        for doc in documents:
            data = doc.encode()
            if used + len(data) >= sample_bytes:
                yield data[:sample_bytes - used].decode("utf-8", "ignore")
                return
            used += len(data)
            yield doc

    tok.train_from_iterator(sample(), trainer)
    if tok.get_vocab_size() <= len(symbols):
        raise TokenizerError("no text to train the tokenizer on", hint="check that the training sources are not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / JSON_FILE, tok.to_str().encode())
    return out_dir / JSON_FILE


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def tokenizer_file(folder: Path) -> Path | None:
    """The tokenizer file of a folder: tokenizer.json, else sentencepiece's tokenizer.model."""
    for name in (JSON_FILE, "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_tokenizer(path: str | Path):
    """A sentencepiece .model or a tokenizer.json, by its name; a folder by the file it holds."""
    from .tokenizer import Tokenizer

    path = Path(path)
    if path.is_dir():
        found = tokenizer_file(path)
        if found is None:
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this folder",
                                 hint="point at a model folder with its tokenizer, or at the file itself")
        path = found
    if path.suffix == ".json":
        if not path.is_file():
            raise TokenizerError(f"tokenizer not found: {path}", hint="check tokenizer.path")
        return JsonTokenizer.load(path)
    return Tokenizer.load(path)
