"""Tokenizer: exact round trip, determinism, error messages, atomic output."""

from __future__ import annotations

import pickle
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmforge.errors import TokenizerError
from llmforge.text.tokenizer import EOT, Tokenizer, train_tokenizer

USER_SYMBOLS = ("<|user|>", "<|assistant|>")


def stdlib_sources(limit: int = 200_000) -> list[str]:
    """About `limit` bytes of Python source from the stdlib, always the same files."""
    docs, used = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        used += len(text.encode())
        if used >= limit:
            break
    return docs


# Things that trip up naive sentencepiece setups: whitespace handling, its "▁" meta symbol,
# bytes outside the vocab, control characters.
AWKWARD = [
    "", "\n\n", "  leading", "trailing  ", "\t\tx", "▁", "a▁b", "▁▁ ▁", " ▁\n▁ ", "emoji 🎉👍🏽", "日本語",
    "\x00", "\r\n", "e\u0301", "\ufeffbom", "def f():\n    return 1\n\n\n", "    \n\t \r\n  ",
    "<|user|>hi<|assistant|>", EOT, "<unk>", "<0x41>", "\U0010ffff", "\u2028\u3000\xa0",
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return stdlib_sources()


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    path = train_tokenizer(iter(docs), out, type="bpe", vocab_size=512, user_symbols=USER_SYMBOLS)
    return Tokenizer.load(path)


def text_bytes(tok: Tokenizer, ids: list[int]) -> int:
    """UTF-8 bytes of the text the ids stand for, special tokens (chat tags) excluded: what
    token_bytes counts for bits per byte."""
    specials = set(tok.specials.values())
    return len(tok.decode([i for i in ids if i not in specials]).encode())


@pytest.mark.parametrize("text", AWKWARD)
def test_round_trip_awkward(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.token_bytes[ids].sum()) == text_bytes(tok, ids)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",))) | st.text("▁ \n\t\r\x00ab日🎉<|>"))
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.token_bytes[ids].sum()) == text_bytes(tok, ids)
    assert 0 <= min(ids, default=0) and max(ids, default=0) < tok.vocab_size


def test_code_round_trip_and_compression(tok, docs):
    held_out = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    # 512 ids, ~350 of them bytes and single characters: ~1.8 bytes/token (~2.9 at vocab 2048).
    assert len(held_out.encode()) / len(ids) > 1.5
    # Training chunks keep their newlines, so the vocab learns pieces that contain them.
    pieces = [tok._sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert any("\n" in p and p.strip() for p in pieces)


def test_encode_batch_matches_encode(tok):
    texts = AWKWARD + ["x" * 5000, "a▁b▁▁c"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_accepts_arrays(tok):
    text = "print('hi')\n▁"
    ids = tok.encode(text)
    assert tok.decode(np.array(ids, dtype=np.int64)) == text
    assert tok.decode(np.array(ids, dtype=np.int32)) == text
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(ids)) == text
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_special_ids(tok):
    assert tok.eot_id == 1 and tok.token_bytes[tok.eot_id] == 0 and tok.token_bytes[0] == 0
    assert tok.decode([tok.eot_id]) == ""
    assert tok.eot_id not in tok.encode(EOT)  # literal text is never the control token
    for sym in USER_SYMBOLS:
        sym_id = tok.special_id(sym)
        assert tok.decode([sym_id]) == sym and tok.token_bytes[sym_id] == 0  # its real id, no text bytes
        # Written in text, a special token's spelling stays text: a message cannot forge a turn.
        text = f"say {sym} now"
        for ids in (tok.encode(text), tok.encode_batch([text])[0]):
            assert sym_id not in ids and tok.decode(ids) == text
    assert set(tok.specials) == set(USER_SYMBOLS)
    assert tok.token_bytes.dtype == np.int32 and tok.token_bytes.shape == (tok.vocab_size,)
    assert tok.vocab_size == 512 and len(tok.fingerprint) == 64


def test_pickle(tok):
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.fingerprint == tok.fingerprint and copy.encode("a▁b\n") == tok.encode("a▁b\n")


def test_deterministic(docs, tmp_path):
    a = train_tokenizer(iter(docs), tmp_path / "a", type="bpe", vocab_size=400)
    b = train_tokenizer(iter(docs), tmp_path / "b", type="bpe", vocab_size=400)
    assert a.read_bytes() == b.read_bytes()
    assert Tokenizer.load(a).fingerprint == Tokenizer.load(b).fingerprint
    assert (tmp_path / "a" / "tokenizer.vocab").read_bytes() == (tmp_path / "b" / "tokenizer.vocab").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left behind


def test_failed_write_keeps_old_model(docs, tmp_path, monkeypatch):
    path = train_tokenizer(iter(docs[:3]), tmp_path / "t", type="char", vocab_size=300)
    before = path.read_bytes()

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("llmforge.text.tokenizer.os.replace", disk_full)
    with pytest.raises(TokenizerError, match="No space left"):
        train_tokenizer(iter(docs), tmp_path / "t", type="bpe", vocab_size=450)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_imports_nothing_heavy():
    code = "import sys, llmforge.text.tokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_unigram_deterministic(docs, tmp_path):
    small = stdlib_sources(60_000)
    a = train_tokenizer(iter(small), tmp_path / "a", type="unigram", vocab_size=400)
    b = train_tokenizer(iter(small), tmp_path / "b", type="unigram", vocab_size=400)
    assert a.read_bytes() == b.read_bytes()
    tok = Tokenizer.load(a)
    assert tok.vocab_size == 400 and tok.decode(tok.encode(AWKWARD[5] + small[0])) == AWKWARD[5] + small[0]


def test_char_vocab_is_an_upper_bound(tmp_path):
    text = "hello world\n" * 100 + "日本語 ▁\n"
    tok = Tokenizer.load(train_tokenizer([text], tmp_path, type="char", vocab_size=5000))
    assert tok.vocab_size < 5000
    assert all(len(tok.encode(c)) == 1 for c in "helo wrd日\n")  # every seen character is one token
    for s in [text, "unseen: ü€\t▁", *AWKWARD]:
        assert tok.decode(tok.encode(s)) == s


def test_overlong_lines_are_not_dropped(tmp_path):
    # sentencepiece silently skips sentences over max_sentence_length bytes: one 100 KB line would
    # leave it nothing to train on.
    tok = Tokenizer.load(train_tokenizer(["é" * 50_000], tmp_path, type="char", vocab_size=300))
    assert tok.encode("é") != [0] and len(tok.encode("é")) == 1


def test_sample_bytes_consumes_lazily(tmp_path):
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield f"line {pulled} of an endless corpus\n" * 50

    train_tokenizer(endless(), tmp_path, type="bpe", vocab_size=300, sample_bytes=50_000)
    assert pulled < 100


def test_vocab_too_large_for_text(tmp_path):
    with pytest.raises(TokenizerError) as e:
        train_tokenizer(["tiny text\n"] * 3, tmp_path / "t", type="bpe", vocab_size=5000)
    assert "vocab_size 5000" in e.value.message and "or less" in e.value.hint
    assert not isinstance(e.value, RuntimeError)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_vocab_too_small(tmp_path):
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(["abc\n" * 100], tmp_path / "t", type="bpe", vocab_size=100)


@pytest.mark.parametrize("kwargs", [
    {"type": "wordpiece"},
    {"vocab_size": 0},
    {"user_symbols": ["<|x|>", "<|x|>"]},
    {"user_symbols": [""]},
    {"user_symbols": [EOT]},
])
def test_bad_settings(tmp_path, kwargs):
    args = {"type": "bpe", "vocab_size": 300, **kwargs}
    with pytest.raises(TokenizerError):
        train_tokenizer(["some text\n"] * 100, tmp_path / "t", **args)


def test_no_text(tmp_path):
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer(iter(["", ""]), tmp_path / "t", type="bpe", vocab_size=300)


def test_errors_from_documents_propagate(tmp_path):
    class Boom(Exception):
        pass

    def docs():
        yield "some text\n" * 100
        raise Boom("bad source")

    with pytest.raises(Boom):
        train_tokenizer(docs(), tmp_path / "t", type="bpe", vocab_size=300)


def test_retrain_into_existing_dir(docs, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    first = train_tokenizer(iter(docs[:3]), tmp_path, type="char", vocab_size=300)
    second = train_tokenizer(iter(docs), tmp_path, type="bpe", vocab_size=450)
    assert first == second and Tokenizer.load(second).vocab_size == 450
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tokenizer.model", "tokenizer.vocab"]


def test_byte_fallback_off(tmp_path):
    tok = Tokenizer.load(train_tokenizer(["hello world\n" * 200], tmp_path, type="bpe", vocab_size=25,
                                         byte_fallback=False))
    assert tok.decode(tok.encode("hello\n")) == "hello\n"
    assert tok.encode("Ω") == [0] and tok.token_bytes[0] == 0  # out of vocab: unk, no round trip


def test_load_errors(tmp_path, tok):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(TokenizerError, match="not a valid"):
        Tokenizer.load(garbage)
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(tok.path.read_bytes()[:1000])
    with pytest.raises(TokenizerError):
        Tokenizer.load(truncated)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError):
        Tokenizer.load(empty)
    assert Tokenizer.load(tok.path.parent).fingerprint == tok.fingerprint  # a directory works too


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_encode_batch_equals_encode(docs, tmp_path, kind):
    """encode_batch's word memo must give exactly sentencepiece's ids, on code and on odd text."""
    tok = Tokenizer.load(train_tokenizer(iter(docs), tmp_path / kind, type=kind, vocab_size=400))
    assert tok._words_are_independent == (kind == "bpe")
    texts = docs + AWKWARD + ["  a  b   c ", " x", "x ", "\n  \n  y", "a\u3000b c\t d", "ab  " * 50]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]  # again, from the memo
    packed = tok.encode_to_bytes(texts, "uint16")
    assert [np.frombuffer(b, dtype=np.uint16).tolist() for b in packed] == [tok.encode(t) for t in texts]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab ▁\n\té日")), max_size=40), max_size=6))
def test_encode_batch_equals_encode_property(tok, texts):
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_foreign_bpe_models_take_the_plain_path(docs, tmp_path):
    """A Llama-style model (dummy prefix, squeezed spaces) must not use the word memo."""
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=proto, model_type="bpe",
                                   vocab_size=600, byte_fallback=True)
    path = tmp_path / "llama-style.model"
    path.write_bytes(proto.getvalue())
    tok = Tokenizer.load(path)
    assert not tok._words_are_independent
    texts = ["hello  world  again", " x y", "a\u3000b"] + docs[:3]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
