"""Token cache: each source tokenized once into a memory-mapped file, keyed by content.

An entry is a folder `<cache>/tokens/<key>/` holding `tokens.bin` (every document's tokens
followed by the end-of-text token, uint16 when the vocab fits, else uint32) and `meta.json`.
The key hashes the source's fingerprint, its options and the tokenizer's fingerprint, so a changed
file or tokenizer can never reuse stale tokens. Entries are written to a temporary folder and
renamed into place: an entry is complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..recipe.schema import SourceSpec
from .sources import iter_pieces, source_fingerprint

CACHE_VERSION = 1
_BATCH_BYTES = 1 << 20  # encode ~1 MB of text per sentencepiece batch call


def cache_dir() -> Path:
    return Path(os.environ.get("LLMFORGE_CACHE") or Path.home() / ".cache" / "llmforge")


@dataclass
class PreparedSource:
    name: str
    tokens: np.ndarray  # memory-mapped, all documents
    split: int  # tokens[:split] train, tokens[split:] held out
    documents: int
    bytes: int
    path: Path

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.split]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.split:]


def cache_key(name: str, spec: SourceSpec, base_dir: Path, tokenizer_fingerprint: str) -> str:
    parts = {
        "version": CACHE_VERSION,
        "source": source_fingerprint(name, spec, base_dir),
        "options": spec.model_dump(mode="json", include={"format", "max_bytes", "val_fraction"}),
        "tokenizer": tokenizer_fingerprint,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def prepare_source(name: str, spec: SourceSpec, base_dir: Path, tokenizer,
                   on_progress: Callable[[int], None] = lambda n: None) -> PreparedSource:
    """Tokenize a source into the cache (or find it there) and map it into memory."""
    key = cache_key(name, spec, base_dir, tokenizer.fingerprint)
    entry = cache_dir() / "tokens" / key
    if not (entry / "meta.json").is_file():
        _clean_stale(entry.parent)
        _write_entry(entry, name, spec, base_dir, tokenizer, on_progress)
    return load_entry(name, entry)


def load_entry(name: str, entry: Path) -> PreparedSource:
    meta = json.loads((entry / "meta.json").read_text())
    tokens = np.memmap(entry / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r",
                       shape=(meta["tokens"],)) if meta["tokens"] else np.zeros(0, dtype=meta["dtype"])
    return PreparedSource(name, tokens, meta["split"], meta["documents"], meta["bytes"], entry)


def _write_entry(entry: Path, name, spec, base_dir, tokenizer, on_progress) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_tokens = n_docs = n_bytes = 0
    with open(tmp / "tokens.bin", "wb") as f:
        batch, ends, batch_bytes = [], [], 0

        def flush():
            nonlocal n_tokens
            for ids, end in zip(tokenizer.encode_batch(batch), ends):
                if end:
                    ids.append(tokenizer.eot_id)
                np.asarray(ids, dtype=dtype).tofile(f)
                n_tokens += len(ids)
            batch.clear()
            ends.clear()

        for text, end in iter_pieces(name, spec, base_dir):
            size = len(text.encode("utf-8"))
            batch.append(text)
            ends.append(end)
            batch_bytes += size
            n_docs += end
            n_bytes += size
            if batch_bytes >= _BATCH_BYTES:
                flush()
                on_progress(batch_bytes)
                batch_bytes = 0
        flush()
        on_progress(batch_bytes)
    if n_docs == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"data.{name}: the source has no text (every file is empty)",
                        hint="point the source at files with content")
    # The tail of the source is held out (like nanoGPT's last 10%): simple, and for one long
    # document (a novel, a log) it is the only split that leaks nothing.
    split = n_tokens - int(n_tokens * spec.val_fraction)
    meta = {"version": CACHE_VERSION, "source": name, "dtype": np.dtype(dtype).name, "tokens": n_tokens,
            "split": split, "documents": n_docs, "bytes": n_bytes, "tokenizer": tokenizer.fingerprint}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(entry, ignore_errors=True)  # a leftover without meta.json is not a valid entry
    try:
        os.replace(tmp, entry)
    except OSError:  # another process finished the same entry first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
        if not (entry / "meta.json").is_file():
            raise


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
