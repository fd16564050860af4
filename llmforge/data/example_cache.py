"""Token cache entries for conversation data (chat, prompt_response, preference, unpaired, prompt).

Besides `tokens.bin` and `meta.json` (as for text, see cache.py), an entry holds `learned.bin`
(one byte per token: 1 where the token is the assistant's, so a training target under
train_on: assistant), `offsets.npy` (where each sequence starts; a preference pair is two
sequences, prompt+chosen then prompt+rejected) and `origins.npy` (file number and line of each
example, so a plan-time problem can name the record); a prompt source also `prompts.json`, each
prompt's reference answer (or null, kept as text for the verifiers) and its whole record (for reward plugins), and an unpaired source
`labels.json`, each reply's label (true: good). The held-out split is the last
val_fraction of *examples*, not tokens: an example is never cut in two.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core import faults
from ..errors import DataError, TokenizerError
from ..text.chat import ChatTemplate
from . import procs
from .columnar import SUFFIXES as COLUMNAR
from .formats import FORMATS, read_examples
from .rows import Examples
from .sources import Skips, SourceReport, list_files


@dataclass
class PreparedExamples:
    name: str
    tokens: np.ndarray  # memory-mapped, every sequence end to end
    learned: np.ndarray  # memory-mapped uint8 flags, one per token
    offsets: np.ndarray  # [sequences + 1]
    origins: np.ndarray  # [examples, 2]: file number, line
    prompts: list | None  # prompt sources: each example's {"answer": str or None, "record": dict}
    labels: np.ndarray | None  # unpaired sources: [examples] bool, True for a good reply
    files: list[str]
    per_example: int  # 1, or 2 for preference pairs
    split: int  # examples[:split] train, examples[split:] held out
    documents: int  # examples
    bytes: int
    skipped: int
    filtered: int
    path: Path
    format: str  # the source's data format (chat, preference, unpaired, ...)
    reasons: dict  # why records were dropped -> how many (sources.Skips)

    def _part(self, lo: int, hi: int) -> Examples:
        k = self.per_example
        return Examples(self.tokens, self.learned, self.offsets[lo * k:hi * k + 1], k,
                        lambda i: self.where(lo + i), None if self.prompts is None else self.prompts[lo:hi],
                        None if self.labels is None else self.labels[lo:hi])

    @property
    def train(self) -> Examples:
        return self._part(0, self.split)

    @property
    def val(self) -> Examples:
        return self._part(self.split, self.documents)

    def where(self, i: int) -> str:
        f, line = self.origins[i]  # a line of JSON lines, a row of parquet or Arrow
        return f"{self.files[f]}: row {line}" if self.files[f].endswith(COLUMNAR) else f"{self.files[f]}:{line}"


_PER_BATCH = 128  # examples a worker renders and encodes at a time
PARALLEL_BYTES = 8 << 20  # a source this big is tokenized by worker processes (spawning them costs ~1 s)


def write_examples(tmp: Path, name, spec, base_dir, tokenizer, template: ChatTemplate, on_progress,
                   workers: int | None = None) -> None:
    """Records are read and checked here, in order; rendering through the chat template and
    encoding, the costly part, runs in `workers` processes a batch at a time (by default every
    core for a source over PARALLEL_BYTES), written back in order: the entry is the same either way."""
    fmt = FORMATS[spec.format]
    tmp.mkdir(parents=True)
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    skips = Skips()
    report = SourceReport(name, spec, skips)
    files = list_files(name, spec, base_dir)
    if workers is None:
        workers = procs.cores() if sum(p.stat().st_size for p in files) > PARALLEL_BYTES else 1
    offsets, origins, extras, n_bytes, total = [0], [], [], 0, 0
    with open(tmp / "tokens.bin", "wb") as tok_f, open(tmp / "learned.bin", "wb") as learn_f, \
            procs.pool(tokenizer, workers, template) as pool:
        pending: deque = deque()

        def drain(limit: int) -> None:
            nonlocal n_bytes, total
            while len(pending) > limit:
                future, batch = pending.popleft()
                for (where, example, number), (ids, learned, lengths, size, error) in \
                        zip(batch, future.result() if pool else future):
                    if error:  # the template refuses this conversation: an error, or counted under on_error: skip
                        report.bad(where, *error)
                        continue
                    tok_f.write(ids)
                    learn_f.write(learned)
                    for n in lengths:
                        total += n
                        offsets.append(total)
                    n_bytes += size
                    # a line of JSON lines ("path:12"), a row of parquet or Arrow ("path: row 12")
                    origins.append((number, int(where.rsplit(" " if files[number].name.endswith(COLUMNAR) else ":",
                                                             1)[1])))
                    if len(origins) % 16 == 0:
                        faults.reached("data", name, "example", len(origins))
                    if fmt.extra:
                        extras.append(example[-1])

        batch: list = []
        for number, path in enumerate(files):
            for where, example in read_examples(path, spec, report):
                batch.append((where, example, number))
                if len(batch) == _PER_BATCH:
                    args = (spec.format, [ex for _, ex, _ in batch], dtype)
                    pending.append((pool.submit(_encode, args) if pool else _encode_with(tokenizer, template, args),
                                    batch))
                    batch = []
                    drain(2 * max(workers, 1))
            on_progress(path.stat().st_size)
        if batch:
            args = (spec.format, [ex for _, ex, _ in batch], dtype)
            pending.append((pool.submit(_encode, args) if pool else _encode_with(tokenizer, template, args), batch))
        drain(0)
    n = len(origins)
    if n == 0:
        why = f"all {skips.bad + skips.filtered} records were skipped or filtered" if skips.bad + skips.filtered \
            else "every file is empty"
        raise DataError(f"data.{name}: the source has no examples ({why})", hint="point the source at files with records")
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(tmp / "origins.npy", np.asarray(origins, dtype=np.int64).reshape(-1, 2))
    if fmt.extra:
        # default=str: a parquet record's dates and bytes, which JSON has no type for
        (tmp / f"{fmt.extra}.json").write_text(json.dumps(extras, ensure_ascii=False, default=str))
    meta = {"kind": "examples", "format": spec.format, "source": name, "dtype": dtype, "tokens": total,
            "per_example": fmt.per_example, "split": n - int(round(n * spec.val_fraction, 9)),
            "documents": n, "bytes": n_bytes, "skipped": skips.bad, "filtered": skips.filtered,
            "skip_examples": skips.examples, "reasons": skips.reasons, "files": [str(p) for p in files],
            "tokenizer": tokenizer.fingerprint}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _encode(args) -> list:
    return _encode_with(procs.TOKENIZER, procs.TEMPLATE, args)


def _encode_with(tokenizer, template, args) -> list:
    """Per example: (token bytes, learned bytes, each sequence's length, bytes of text, None), or
    (..., (message, hint)) where the template refuses it."""
    fmt, examples, dtype = args
    out = []
    for example in examples:
        try:
            sequences = FORMATS[fmt].sequences(example, template)
        except TokenizerError as e:
            out.append((b"", b"", [], 0, (e.message, e.hint)))
            continue
        ids_all, learned_all, lengths = [], [], []
        for segments in sequences:
            ids, learned = template.encode(tokenizer, segments)
            ids_all += ids
            learned_all += learned
            lengths.append(len(ids))
        size = sum(len(text.encode()) for segments in sequences for text, special, _ in segments if not special)
        out.append((np.asarray(ids_all, dtype=dtype).tobytes(), np.asarray(learned_all, dtype=np.uint8).tobytes(),
                    lengths, size, None))
    return out


def load_examples(name: str, entry: Path, meta: dict, tokens: np.ndarray, learned: np.ndarray) -> PreparedExamples:
    fmt, extras = FORMATS[meta["format"]], {"prompts": None, "labels": None}
    if fmt.extra:  # each example's last item: a prompt's reference answer, an unpaired reply's label
        extras[fmt.extra] = fmt.extra_type(json.loads((entry / f"{fmt.extra}.json").read_text()))
    return PreparedExamples(name, tokens, learned, np.load(entry / "offsets.npy"), np.load(entry / "origins.npy"),
                            extras["prompts"], extras["labels"], meta["files"], meta["per_example"], meta["split"], meta["documents"], meta["bytes"],
                            meta["skipped"], meta["filtered"], entry, meta["format"], meta.get("reasons", {}))
