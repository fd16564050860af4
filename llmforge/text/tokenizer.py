"""Train and use sentencepiece tokenizers that round-trip any text exactly.

Exactness matters because the training corpus is often source code: losing a newline, a tab or a
run of indentation would silently teach the model wrong text. So we train with normalization and
whitespace cleanup switched off, rely on byte fallback for anything outside the vocab, and decode
ids ourselves through a per-id bytes table instead of trusting sentencepiece's decoder.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm

from ..core import faults
from ..errors import TokenizerError

EOT = "<|endoftext|>"
MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
TYPES = ("bpe", "unigram", "char")

# sentencepiece writes spaces as U+2581 internally, so a literal U+2581 in the input would decode
# as a space. We encode literal ones through their byte-fallback tokens instead.
META_SPACE = "\u2581"
# sentencepiece silently drops training sentences longer than max_sentence_length (bytes), so we
# feed it chunks of whole lines well below that limit. Overlong lines are cut every _LINE_CHARS
# characters (at most 4 bytes each, so a cut piece always fits in a chunk).
_CHUNK_BYTES = 2000
_LINE_CHARS = _CHUNK_BYTES // 4
# encode_batch cuts text at word starts (see there) and remembers up to this many words' ids
# (~100 MB at most).
_WORD = re.compile(r" *[^ ]+| +")  # a word: its leading spaces, then non-spaces (or trailing spaces)
_MEMO_WORDS = 500_000
_MEMO_CHARS = 20_000_000
# The thread count is recorded inside the .model file and decides how the trainer splits its work,
# so it must be a constant (not os.cpu_count()) for the output to be identical on every machine.
_TRAIN_THREADS = 8


class _Sample:
    """At most `budget` UTF-8 bytes of `documents`, lazily, as chunks of whole lines ("\\n" kept,
    so pieces like "):\\n" can be learned). Remembers how much it produced and any exception raised
    by `documents`, which sentencepiece would otherwise turn into a bare RuntimeError."""

    def __init__(self, documents: Iterable[str], budget: int):
        self.documents, self.budget, self.used = documents, budget, 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._chunks()
        except (Exception, KeyboardInterrupt) as e:
            self.error = e
            raise

    def _chunks(self) -> Iterator[str]:
        chunks = 0
        for doc in self.documents:
            buf: list[str] = []
            size = 0
            for line in doc.splitlines(keepends=True):
                for i in range(0, len(line), _LINE_CHARS):
                    part = line[i : i + _LINE_CHARS]
                    n = len(part.encode())
                    if buf and size + n > _CHUNK_BYTES:
                        yield "".join(buf)
                        buf, size, chunks = [], 0, chunks + 1
                        if chunks % 8 == 0:
                            faults.reached("tokenizer", "chunk", chunks)
                    buf.append(part)
                    size += n
                    self.used += n
                    if self.used >= self.budget:
                        yield "".join(buf)
                        return
            if buf:  # chunks never span two documents
                yield "".join(buf)


def train_tokenizer(documents: Iterable[str], out_dir: Path, *, type: str, vocab_size: int,
                    byte_fallback: bool = True, sample_bytes: int = 10_000_000,
                    user_symbols: Sequence[str] = ()) -> Path:
    """Train a sentencepiece model on at most `sample_bytes` of `documents`; write
    out_dir/tokenizer.model and out_dir/tokenizer.vocab atomically; return the .model path.
    The same documents and settings always give a byte-identical tokenizer.model."""
    if type not in TYPES:
        raise TokenizerError(f"unknown tokenizer type {type!r}", hint=f"use one of: {', '.join(TYPES)}")
    if vocab_size <= 0 or sample_bytes <= 0:
        raise TokenizerError(f"vocab_size ({vocab_size}) and sample_bytes ({sample_bytes}) must be positive")
    symbols = list(user_symbols)
    for s in symbols:
        if not s or s in ("<unk>", EOT) or symbols.count(s) > 1:
            raise TokenizerError(f"bad user symbol {s!r}", hint="user symbols must be non-empty, unique, "
                                 f"and differ from <unk> and {EOT}")

    sample = _Sample(documents, sample_bytes)
    proto = io.BytesIO()
    spm.set_min_log_level(2)  # sentencepiece logs every training step to stderr; keep errors only
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=proto,  # in memory: no paths in the model
            model_type=type, vocab_size=vocab_size, byte_fallback=byte_fallback,
            user_defined_symbols=symbols,
            # Keep the text exactly as written: no NFKC, no dummy " " prefix, no space squeezing.
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # indentation runs become single tokens
            split_digits=True,
            # A char vocab needs every character; otherwise rare characters go through byte fallback.
            character_coverage=1.0 if type == "char" else 0.9995,
            hard_vocab_limit=type != "char",  # for char, vocab_size is only an upper bound
            unk_id=0, eos_id=1, eos_piece=EOT, bos_id=-1, pad_id=-1,
            max_sentence_length=2 * _CHUNK_BYTES, input_sentence_size=0,  # 0: use every sentence
            num_threads=_TRAIN_THREADS,
        )
    except RuntimeError as e:
        if sample.error is not None:
            raise sample.error from None
        raise _training_error(str(e), vocab_size, sample.used) from None
    return _write_atomically(Path(out_dir), proto.getvalue())


def _training_error(msg: str, vocab_size: int, used: int) -> TokenizerError:
    """Turn sentencepiece's internal check failures into messages about the user's settings."""
    if used == 0:
        return TokenizerError("no text to train the tokenizer on", hint="check that the training sources are not empty")
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg):
        return TokenizerError(
            f"vocab_size {vocab_size} is too large for the training text ({used:,} bytes): "
            f"sentencepiece can only find {m[1]} distinct pieces in it",
            hint=f"set tokenizer.vocab_size to {m[1]} or less, or train on more text")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        return TokenizerError(
            f"vocab_size {vocab_size} is too small: the characters of the training text, the byte "
            f"fallback tokens and the special tokens alone need {m[1]} ids",
            hint=f"set tokenizer.vocab_size to at least {m[1]}")
    detail = msg.split("] ", 1)[-1].strip() or msg  # drop "INTERNAL: src/x.cc(42) [check]" noise
    return TokenizerError(f"sentencepiece could not train the tokenizer: {detail}")


def _write_atomically(out_dir: Path, model: bytes) -> Path:
    """Write both files into a temp dir next to out_dir, then move them in with one rename (new
    out_dir) or os.replace per file (existing out_dir, model last), so a crash never leaves a
    truncated tokenizer.model."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    # Our own .vocab (sentencepiece's is only written in file mode): escape whitespace so that
    # pieces like "):\n" stay on one line.
    esc = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
    vocab = "".join(f"{sp.id_to_piece(i).translate(esc)}\t{sp.get_score(i):g}\n"
                    for i in range(sp.get_piece_size())).encode()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            for name, data in ((VOCAB_FILE, vocab), (MODEL_FILE, model)):
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            if not out_dir.exists():
                os.rename(tmp, out_dir)
            else:
                for name in (VOCAB_FILE, MODEL_FILE):
                    os.replace(tmp / name, out_dir / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise TokenizerError(f"cannot write the tokenizer to {out_dir}: {e.strerror or e}") from None
    return out_dir / MODEL_FILE


def _words_are_independent(model: bytes) -> bool:
    """Whether encoding word by word (see encode_batch) gives exactly sentencepiece's ids: BPE
    (trainer_spec.model_type 2), whitespace as a word prefix and a word boundary (trainer fields
    24 and 22), and text kept as written (normalizer "identity", no dummy prefix, no whitespace
    squeezing: normalizer fields 1, 3, 4; 3 and 4 default to true when absent). That is how
    llmforge trains; models from elsewhere (Llama's add a dummy prefix) take the plain path.
    Read straight from the serialized ModelProto, so no protobuf package is needed."""
    try:
        top = dict(proto_fields(model))
        trainer, normalizer = dict(proto_fields(top[2])), dict(proto_fields(top[3]))
    except (KeyError, IndexError):
        return False
    return (trainer.get(3) == 2 and not trainer.get(24, 0) and trainer.get(22, 1) == 1
            and normalizer.get(1) == b"identity" and normalizer.get(3, 1) == 0 and normalizer.get(4, 1) == 0)


def _user_defined(model: bytes) -> dict[str, int]:
    """{piece: id} of the model's user-defined pieces (ModelProto field 1: pieces, each with its
    text in field 1 and its type in field 3, USER_DEFINED = 4); the Python API does not say."""
    out = {}
    for i, (number, value) in enumerate((n, v) for n, v in proto_fields(model) if n == 1):
        fields = dict(proto_fields(value))
        if fields.get(3) == 4:
            out[fields[1].decode()] = i
    return out


def proto_fields(buf: bytes):
    """(field number, value) pairs of a serialized protobuf message: varints as ints,
    length-delimited fields as bytes, fixed-width ones as None."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise IndexError("unknown wire type")
        yield number, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


class Tokenizer:
    """A loaded sentencepiece model. encode() adds no BOS/EOS; decode(encode(s)) == s exactly
    (given byte fallback)."""

    def __init__(self, path: Path, model: bytes):
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model)
        except RuntimeError:
            raise TokenizerError(f"{path} is not a valid sentencepiece model (corrupt or truncated?)",
                                 hint="retrain the tokenizer or point tokenizer.path at a .model file") from None
        self._sp, self._model = sp, model
        self.path = path
        self.fingerprint = hashlib.sha256(model).hexdigest()
        self.vocab_size = sp.get_piece_size()
        eot = sp.piece_to_id(EOT)
        self.eot_id = eot if sp.is_control(eot) else sp.eos_id()  # foreign models: their </s>
        if self.eot_id < 0:
            raise TokenizerError(f"{path} has no end-of-text token ({EOT} or an eos piece)",
                                 hint="train the tokenizer with llmforge, or use a model that defines eos")
        # What each id decodes to: byte pieces "<0xNN>" one byte, control/unknown ids nothing.
        table = [b"" if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                 else bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i)
                 else sp.id_to_piece(i).replace(META_SPACE, " ").encode() for i in range(self.vocab_size)]
        self._bytes = table
        # User-defined symbols (the chat template's tags) are whole tokens that no text merge makes.
        self.specials = _user_defined(model)
        # Bytes of *text* each id stands for (bits per byte): control and special tokens count none.
        self.token_bytes = np.fromiter(map(len, table), dtype=np.int32, count=self.vocab_size)
        self.token_bytes[list(self.specials.values())] = 0
        byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        self._byte_ids = byte_ids if all(sp.is_byte(i) for i in byte_ids) else None
        # Written out in text, these are bytes: a literal U+2581 is not a space, and a message that
        # contains "<|end|>" cannot forge a turn (special tokens come only from special_id).
        self._literal = re.compile("|".join(map(re.escape, [META_SPACE, *sorted(self.specials, key=len, reverse=True)])))
        self._memo: dict[str, list[int]] = {}  # word -> ids, for encode_batch
        self._memo_bytes: dict[str, dict[str, bytes]] = {}  # dtype -> word -> packed ids
        self._memo_chars = 0  # characters of the words in the memos, to bound them
        self._words_are_independent = _words_are_independent(model)
        self._threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        try:
            model = path.read_bytes()  # read once: the fingerprint is of exactly what we load
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer model not found: {path}",
                                 hint="check tokenizer.path, or give vocab_size to train one") from None
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer model {path}: {e.strerror or e}") from None
        return cls(path, model)

    @property
    def model_bytes(self) -> bytes:
        """The serialized sentencepiece model, exactly as loaded."""
        return self._model

    def __reduce__(self):  # picklable for data-loading worker processes
        return (Tokenizer, (self.path, self._model))

    @property
    def files(self) -> dict[str, bytes]:
        """What a folder holds to load this tokenizer again (name -> content)."""
        return {MODEL_FILE: self._model}

    def special_id(self, piece: str) -> int:
        """The id of a user-defined symbol such as the chat template's <|user|>."""
        if piece not in self.specials:
            known = ", ".join(self.specials) or "none"
            raise TokenizerError(f"{self.path}: the tokenizer has no special token {piece!r} (it has: {known})",
                                 hint="set tokenizer.chat_template so the tokenizer is trained with its tokens, "
                                      "or load a tokenizer that has them")
        return self.specials[piece]

    def encode(self, text: str) -> list[int]:
        return self._encode_literal(text) if self._careful(text) else self._sp.encode(text)

    def _careful(self, text: str) -> bool:
        return META_SPACE in text or bool(self.specials and self._literal.search(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, several times faster on real corpora.

        BPE never merges across the start of a space-led word (split_by_whitespace), so text cut
        just before each space that follows a non-space encodes to the same ids word by word.
        Corpora repeat their words endlessly: with a memo of word -> ids, most words are looked
        up, not encoded. (Unigram's Viterbi may break ties differently on a cut text, so it takes
        the plain path.) Tests check the ids equal encode()'s.
        """
        if not self._words_are_independent:
            return [self.encode(t) for t in texts] if any(map(self._careful, texts)) else \
                self._sp.encode(list(texts), num_threads=self._threads)
        words = self._memoize(texts, self._memo, list)
        lookup = self._memo.__getitem__
        return [self._encode_literal(t) if ws is None else list(chain.from_iterable(map(lookup, ws)))
                for t, ws in zip(texts, words)]

    def encode_to_bytes(self, texts: list[str], dtype: str) -> list[bytes]:
        """encode_batch() as packed arrays of `dtype` (what the token cache stores): joining the
        memoized bytes of each word skips building Python int lists, the slow part."""
        if not self._words_are_independent:
            return [np.asarray(ids, dtype=dtype).tobytes() for ids in self.encode_batch(texts)]
        memo = self._memo_bytes.setdefault(dtype, {})
        words = self._memoize(texts, memo, lambda ids: np.asarray(ids, dtype=dtype).tobytes())
        return [np.asarray(self._encode_literal(t), dtype=dtype).tobytes() if ws is None
                else b"".join(map(memo.__getitem__, ws)) for t, ws in zip(texts, words)]

    def _memoize(self, texts: list[str], memo: dict, convert) -> list[list[str] | None]:
        """Split texts into words (None for a text with a literal U+2581 or a
        special token's spelling: the rare slow path) and
        make sure every word is in the memo. The memo is emptied when it would grow past its bound."""
        words = [None if self._careful(t) else _WORD.findall(t) for t in texts]
        seen: set[str] = set()
        for ws in words:
            if ws:
                seen.update(ws)
        missing = seen.difference(memo)
        added = sum(map(len, missing))
        if len(memo) + len(missing) > _MEMO_WORDS or self._memo_chars + added > _MEMO_CHARS:
            memo.clear()  # text with few spaces (CJK, minified code) has long, rarely repeated words
            missing, self._memo_chars = seen, 0
            added = sum(map(len, missing))
        self._memo_chars += added
        if missing:
            missing = list(missing)
            memo.update(zip(missing, map(convert, self._sp.encode(missing, num_threads=self._threads))))
        return words

    def _encode_literal(self, text: str) -> list[int]:
        """Encode the text between literals (U+2581, special tokens' spellings) normally and each
        literal as its UTF-8 bytes (or <unk> without byte fallback)."""
        out, pos = [], 0
        for m in self._literal.finditer(text):
            out += self._sp.encode(text[pos:m.start()])
            out += [self._byte_ids[b] for b in m.group().encode()] if self._byte_ids else [self._sp.unk_id()]
            pos = m.end()
        return out + self._sp.encode(text[pos:])

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):  # numpy array or torch tensor, without importing torch
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {min(ids)}..{max(ids)}")
        # "replace": generated ids may split a UTF-8 character across byte tokens.
        return b"".join([self._bytes[i] for i in ids]).decode("utf-8", "replace")
