"""Token cache: each source tokenized once into a memory-mapped file, keyed by content.

An entry is a folder `<cache>/tokens/<key>/` holding `tokens.bin` (every document's tokens
followed by the end-of-text token, uint16 when the vocab fits, else uint32) and `meta.json`.
The key hashes the source's content, the options that shape its documents and the tokenizer's
fingerprint, so a changed file or tokenizer can never reuse stale tokens. Entries are written to
a temporary folder and renamed into place: an entry is complete or absent. The cache is shared
by every run and stage on the machine (`~/.cache/llmforge`, or `$LLMFORGE_CACHE`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..core import durable, faults
from ..core.paths import cache_dir
from ..errors import DataError
from .detect import concrete
from . import procs
from .example_cache import load_examples, write_examples
from .formats import FORMATS
from .pieces import iter_pieces
from .sources import Skips, list_files
from .spec import SourceSpec

CACHE_VERSION = 6  # 6: a prompt source keeps each whole record (prompts.json)
_BATCH_BYTES = 1 << 20  # ~1 MB of text per encode call: big enough to amortize, small to bound memory
# Options that change which documents a source yields (val_fraction only moves the split point).
_SHAPING = {"builtin", "hf", "subset", "revision", "format", "split", "field", "role_map", "train_on_reasoning",
            "prompt_field", "response_field", "min_chars",
            "max_chars", "on_error", "max_bytes", "val_fraction"}


@dataclass
class PreparedSource:
    name: str
    tokens: np.ndarray  # memory-mapped, all documents
    split: int  # tokens[:split] train, tokens[split:] held out
    documents: int
    bytes: int
    skipped: int  # bad records skipped (on_error: skip)
    filtered: int  # documents dropped by min_chars / max_chars
    path: Path
    reasons: dict  # why records were dropped -> how many (sources.Skips)

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.split]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.split:]


def source_fingerprint(name: str, spec: SourceSpec, base_dir: Path) -> str:
    """Hash of the source's file contents.

    Reading a large corpus to hash it costs seconds, so the content hash is remembered under a
    key of (path, size, mtime) of every file, as make and rsync decide: an untouched corpus is
    recognized from its file listing alone; a touched one is hashed again.
    """
    files = list_files(name, spec, base_dir)
    listing = [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]]
    memo = cache_dir() / "fingerprints" / hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]
    if memo.is_file():
        return memo.read_text()
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".tmp-{memo.name}-{os.getpid()}")
    tmp.write_text(h.hexdigest())
    os.replace(tmp, memo)
    return h.hexdigest()


def cache_key(name: str, spec: SourceSpec, base_dir: Path, tokenizer_fingerprint: str) -> str:
    spec = concrete(name, spec, base_dir)
    parts = {
        "version": CACHE_VERSION,
        "content": source_fingerprint(name, spec, base_dir),
        "options": spec.model_dump(mode="json", include=_SHAPING),
        "tokenizer": tokenizer_fingerprint,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _entry(name: str, spec: SourceSpec, base_dir: Path, tokenizer, template) -> Path:
    key = cache_key(name, spec, base_dir, tokenizer.fingerprint)
    if FORMATS[spec.format].conversations:  # the template decides the tokens around every turn
        key = hashlib.sha256(json.dumps([key, template.to_dict()]).encode()).hexdigest()[:32]
    return cache_dir() / "tokens" / key


def find_source(name: str, spec: SourceSpec, base_dir: Path, tokenizer, template=None):
    """The cached entry for this source and tokenizer, if it exists intact (never tokenizes)."""
    spec = concrete(name, spec, base_dir)
    entry = _entry(name, spec, base_dir, tokenizer, template)
    return load_entry(name, entry) if _intact(entry) else None


def _intact(entry: Path, note: Callable[[str], None] = lambda message: None) -> bool:
    """Complete, and every file as it was sealed (checked each time: ~1.8 GB/s)."""
    if not entry.is_dir():
        return False
    if why := durable.damage(entry) or (None if _complete(entry) else "its files are incomplete"):
        note(f"token cache entry {entry} is damaged ({why}); tokenizing the source again")
        return False
    return True


def _complete(entry: Path) -> bool:
    """meta.json present and the token files exactly as long as it says (not cut short by a crash)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        ok = (entry / "tokens.bin").stat().st_size == meta["tokens"] * np.dtype(meta["dtype"]).itemsize
        if meta.get("kind") == "examples":
            ok = ok and (entry / "learned.bin").stat().st_size == meta["tokens"] and (entry / "offsets.npy").is_file()
        return ok
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_source(name: str, spec: SourceSpec, base_dir: Path, tokenizer,
                   on_progress: Callable[[int], None] = lambda n: None, workers: int | None = None,
                   template=None, note: Callable[[str], None] = lambda message: None):
    """Tokenize a source into the cache (or find it there intact; `note` hears of a damaged entry,
    tokenized again) and map it into memory: a PreparedSource (text) or PreparedExamples (chat,
    prompt_response, preference; needs the chat template)."""
    spec = concrete(name, spec, base_dir)
    if FORMATS[spec.format].conversations and template is None:
        raise DataError(f"data.{name}: {spec.format} data needs a chat template",
                        hint="set tokenizer.chat_template: default")
    entry = _entry(name, spec, base_dir, tokenizer, template)
    if not _intact(entry, note):
        _clean_stale(entry.parent)
        tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
        with durable.writing(tmp, entry):  # on any error (Ctrl-C too) tmp must not linger
            if FORMATS[spec.format].conversations:
                write_examples(tmp, name, spec, base_dir, tokenizer, template, on_progress, workers)
            else:
                _write_entry(tmp, name, spec, base_dir, tokenizer, on_progress, workers or procs.default_workers(tokenizer))
            durable.seal(tmp)
            faults.reached("data", name, "publish")
            _publish(tmp, entry)
        shutil.rmtree(tmp, ignore_errors=True)  # not renamed when another process published first
    return load_entry(name, entry)


def _publish(tmp: Path, entry: Path) -> None:
    if _intact(entry):  # another process finished the same entry first: theirs is as good as ours
        return
    shutil.rmtree(entry, ignore_errors=True)  # an incomplete or damaged leftover
    try:
        os.replace(tmp, entry)
    except OSError:
        if not _intact(entry):
            raise
    durable.fsync(entry.parent)


def load_entry(name: str, entry: Path):
    meta = json.loads((entry / "meta.json").read_text())
    tokens = _map(entry / "tokens.bin", meta["dtype"], meta["tokens"])
    if meta.get("kind") == "examples":
        return load_examples(name, entry, meta, tokens, _map(entry / "learned.bin", "uint8", meta["tokens"]))
    return PreparedSource(name, tokens, meta["split"], meta["documents"], meta["bytes"], meta["skipped"],
                          meta["filtered"], entry, meta.get("reasons", {}))


def _map(path: Path, dtype: str, n: int) -> np.ndarray:
    if not n:
        return np.zeros(0, dtype=dtype)
    arr = np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=(n,))
    if hasattr(getattr(arr, "_mmap", None), "madvise"):
        # Training reads scattered windows: without this, each page fault pulls in ~128 KB of
        # readahead, and resident memory creeps toward the corpus size.
        arr._mmap.madvise(mmap.MADV_RANDOM)
    return arr


def _encode(args: tuple[list[str], list[bool], str]) -> bytes:
    return _encode_with(procs.TOKENIZER, args)


def _encode_with(tok, args: tuple[list[str], list[bool], str]) -> bytes:
    """Token bytes of a batch of pieces, end-of-text after each piece that ends a document."""
    texts, ends, dtype = args
    eot = np.asarray([tok.eot_id], dtype=dtype).tobytes()
    return b"".join(ids + eot if end else ids for ids, end in zip(tok.encode_to_bytes(texts, dtype), ends))


def _batches(pieces, dtype: str):
    """~1 MB groups of (texts, ends_document flags), with their byte size."""
    texts, ends, size = [], [], 0
    for text, end in pieces:
        texts.append(text)
        ends.append(end)
        size += len(text.encode("utf-8"))
        if size >= _BATCH_BYTES:
            yield (texts, ends, dtype), size
            texts, ends, size = [], [], 0
    if texts:
        yield (texts, ends, dtype), size


def _write_entry(tmp: Path, name, spec, base_dir, tokenizer, on_progress, workers: int) -> None:
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skips = Skips()
    n_bytes = n_docs = 0
    itemsize = np.dtype(dtype).itemsize
    with open(tmp / "tokens.bin", "wb") as f, procs.pool(tokenizer, workers) as pool:
        # Results are written in submission order, with at most 2 batches per worker in flight:
        # parallel, deterministic, and memory-bounded whatever the corpus size.
        pending: deque = deque()
        batches: list = []

        def drain(limit: int) -> None:
            while len(pending) > limit:
                future, size = pending.popleft()
                f.write(future.result() if pool else future)
                on_progress(size)
                faults.reached("data", name, "batch", batches.append(1) or len(batches))

        for args, size in _batches(iter_pieces(name, spec, base_dir, skips), dtype):
            n_bytes += size
            n_docs += sum(args[1])
            pending.append((pool.submit(_encode, args) if pool else _encode_with(tokenizer, args), size))
            drain(2 * workers)
        drain(0)
    n_tokens = (tmp / "tokens.bin").stat().st_size // itemsize
    if n_docs == 0:
        why = f"all {skips.bad + skips.filtered} records were skipped or filtered" if skips.bad + skips.filtered \
            else "every file is empty"
        raise DataError(f"data.{name}: the source has no text ({why})", hint="point the source at files with content")
    # The tail of the source is held out (like nanoGPT's last 10%): simple, and for one long
    # document (a novel, a log) it is the only split that leaks nothing.
    split = n_tokens - int(n_tokens * spec.val_fraction)
    meta = {"version": CACHE_VERSION, "source": name, "dtype": dtype, "tokens": n_tokens, "split": split,
            "documents": n_docs, "bytes": n_bytes, "skipped": skips.bad, "filtered": skips.filtered,
            "reasons": skips.reasons,
            "skip_examples": skips.examples, "tokenizer": tokenizer.fingerprint}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _clean_stale(folder: Path) -> None:
    """Remove temporary entries left by killed processes (their pid is in the name)."""
    for p in folder.glob(".tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
