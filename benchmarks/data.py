"""Data pipeline benchmark: tokenization throughput, cache-hit time, sampler share of a step,
and (with --scale) peak memory preparing and training on a corpus much larger than memory.

    python benchmarks/data.py              # ~50 MB corpus from the Python standard library
    python benchmarks/data.py --scale 2G   # also: a 2 GB corpus, peak RSS of prepare and of training
    python benchmarks/data.py --hub 1G     # also: a 1 GB Hub-style parquet dataset, as files and through `datasets`

Targets on a 2-core CPU: >= 8 MB/s tokenizing, cache hit < 1 s, sampler < 2% of a training step,
peak RSS < 1 GB for a 2 GB corpus. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmforge.core.values import parse_count  # noqa: E402
from llmforge.data.cache import prepare_source  # noqa: E402
from llmforge.data.rows import WindowRows  # noqa: E402
from llmforge.data.sampler import Sampler  # noqa: E402
from llmforge.data.spec import SourceSpec  # noqa: E402
from llmforge.text.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def make_corpus(folder: Path, size: int) -> int:
    """Copies of the standard library's UTF-8 .py files until `size` bytes, in ~20 MB files."""
    texts = []
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            pass
    folder.mkdir(parents=True, exist_ok=True)
    written, i, part = 0, 0, 0
    out = open(folder / f"part-{part:04d}.py", "w", encoding="utf-8")
    while written < size:
        text = texts[i % len(texts)]
        out.write(text)
        written += len(text.encode("utf-8"))
        i += 1
        if out.tell() > 20 << 20:
            out.close()
            part += 1
            out = open(folder / f"part-{part:04d}.py", "w", encoding="utf-8")
    out.close()
    return written


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def throughput(work: Path, tok: Tokenizer, size: int) -> None:
    corpus = work / "corpus"
    n_bytes = make_corpus(corpus, size)
    spec = SourceSpec(path=str(corpus))
    os.environ["LLMFORGE_CACHE"] = str(work / "cache")
    start = time.perf_counter()
    src = prepare_source("bench", spec, work, tok)
    cold = time.perf_counter() - start
    hit = median_time(lambda: prepare_source("bench", spec, work, tok), 5)
    print(f"tokenize   {n_bytes / 2**20:8.1f} MB in {cold:6.2f} s = {n_bytes / 2**20 / cold:6.1f} MB/s "
          f"({len(src.tokens) / cold / 1e6:.2f} M tokens/s, {os.cpu_count()} workers)   target >= 8 MB/s")
    print(f"cache hit  {hit:8.3f} s (median of 5)                                     target < 1 s")
    sampler_share(src, tok)
    json_throughput(work, corpus, n_bytes)


def json_throughput(work: Path, corpus: Path, n_bytes: int) -> None:
    """A byte-level BPE tokenizer.json (the `tokenizers` library, as Llama 3 and Qwen ship):
    its own batch encoding (Rust threads, one process) against llmforge's worker processes."""
    from llmforge.text.tokenizer_json import load_tokenizer, train_bytelevel_bpe

    sample = (p.read_text() for p in sorted((work / "sample").iterdir()))
    tok = load_tokenizer(train_bytelevel_bpe(sample, work / "bbpe", vocab_size=2048, sample_bytes=10 << 20))
    spec = SourceSpec(path=str(corpus))
    for label, workers in (("library threads", 1), (f"{os.cpu_count()} processes", os.cpu_count())):
        os.environ["LLMFORGE_CACHE"] = str(work / f"cache-{workers}")
        start = time.perf_counter()
        src = prepare_source("bench", spec, work, tok, workers=workers)
        cold = time.perf_counter() - start
        print(f"tokenize   {n_bytes / 2**20:8.1f} MB in {cold:6.2f} s = {n_bytes / 2**20 / cold:6.1f} MB/s "
              f"({len(src.tokens) / cold / 1e6:.2f} M tokens/s; tokenizer.json byte-level BPE, {label})")


def sampler_share(src, tok: Tokenizer) -> None:
    """The stdlib recipe's model and training step, with and without drawing its batch."""
    import torch
    import yaml

    from llmforge.model.transformer import Transformer
    from llmforge.optim import build_optimizer
    from llmforge.plan.plan import model_config
    from llmforge.recipe.loader import validate_recipe
    from llmforge.stages import pretrain

    recipe = validate_recipe(yaml.safe_load((ROOT / "recipes/stdlib.yaml").read_text()))
    cfg = model_config(recipe, 2048)
    stage = recipe.stages[0]
    seq, batch = cfg.seq_len, stage.batch_tokens // cfg.seq_len
    sources = [(WindowRows(src.train, seq), 0.7), (WindowRows(src.train[: len(src.train) // 3], seq), 0.3)]
    sampler = Sampler(sources, batch, seed=1, stream=0)
    model = Transformer(cfg)
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1})
    objective = pretrain.Objective(stage, tok.token_bytes)
    drawn = sampler.next_batch()
    units = objective.units(drawn)  # as the engine: counted on the host batch
    fixed = {k: torch.from_numpy(v) for k, v in drawn.items()}

    def step(x):
        (objective.loss(model, x)["loss"] / units).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step(fixed)
    draw = median_time(sampler.next_batch, 200)
    train = median_time(lambda: step(fixed), 30)
    print(f"sampler    {draw * 1e3:8.3f} ms per batch of {batch}x{seq + 1}, step {train * 1e3:.1f} ms "
          f"-> {100 * draw / (draw + train):.2f}% of a step                     target < 2%")


def scale(work: Path, tok_path: Path, size: int) -> None:
    """Peak RSS of `llmforge prepare` and of a short training run on a corpus of `size` bytes."""
    corpus = work / "big"
    n_bytes = make_corpus(corpus, size)
    recipe = work / "big.yaml"
    recipe.write_text(f"""name: big
tokenizer: {{path: {tok_path}}}
model: {{preset: llama, n_layer: 4, n_head: 4, n_embd: 128, seq_len: 128, tie_embeddings: true}}
data:
  big: {{path: {corpus}, val_fraction: 0.1%}}
stages:
  - {{name: pretrain, kind: pretrain, mix: {{big: 1.0}}, steps: 50, batch_tokens: 2Ki,
      eval: {{tokens: 16Ki}}}}
""")
    env = dict(os.environ, LLMFORGE_CACHE=str(work / "cache"))
    for command in ("prepare", "run"):
        start = time.perf_counter()
        # A tiny parent process that reports its child's peak resident memory.
        code = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); " \
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "llmforge", command, str(recipe),
                              "--run-dir", str(work / "run")], env=env, capture_output=True, text=True, check=True)
        peak = int(out.stdout.strip().splitlines()[-1]) / 2**20  # ru_maxrss is in KiB on Linux
        print(f"{command:<10} {n_bytes / 2**30:5.2f} GB corpus: peak RSS {peak:6.2f} GB of one process, "
              f"{time.perf_counter() - start:6.1f} s                target < 1 GB")


def hub_style(work: Path, tok: Tokenizer, size: int) -> None:
    """A dataset laid out as the Hub ships one (FineWeb's shape: data/train-0000i-of-0000n.parquet
    shards of ~256 MB, a text column beside id and url columns), tokenized from its parquet files
    (data.<name>.path) and through `datasets` (data.<name>.hf, which first turns it into Arrow
    files in its cache, once); MB/s of text, tokenizing only, and the `datasets` load apart."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sample = [p.read_text() for p in sorted((work / "sample").iterdir())]
    docs = [d for text in sample for d in text.split("\n\n\n") if d.strip()]
    shard_bytes, n_shards = 256 << 20, max(1, -(-size // (256 << 20)))
    repo = work / "hub-dataset"
    (repo / "data").mkdir(parents=True)
    written, i = 0, 0
    for k in range(n_shards):
        with pq.ParquetWriter(repo / f"data/train-{k:05d}-of-{n_shards:05d}.parquet",
                              pa.schema([("text", pa.string()), ("id", pa.string()), ("url", pa.string())])) as w:
            shard, limit = 0, min(shard_bytes, size - written)
            while shard < limit:
                batch = [docs[(i + j) % len(docs)] for j in range(2000)]
                w.write_table(pa.table({"text": batch, "id": [f"<urn:{i + j}>" for j in range(2000)],
                                        "url": [f"https://example.org/{i + j}" for j in range(2000)]}))
                i += 2000
                n = sum(len(d.encode()) for d in batch)
                shard, written = shard + n, written + n
    print(f"hub-style  {written / 2**20:8.1f} MB of text in {n_shards} parquet shards "
          f"({sum(p.stat().st_size for p in (repo / 'data').iterdir()) / 2**20:.0f} MB on disk)")
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-cache")
    start = time.perf_counter()
    from llmforge.data.hub import hub_files
    hub_files("bench", str(repo), None, None, None)
    print(f"datasets   load into its Arrow cache (once per dataset version): {time.perf_counter() - start:6.1f} s")
    for label, spec in (("parquet files (path:)", SourceSpec(path=str(repo / "data"), format="parquet")),
                        ("datasets' Arrow (hf:)", SourceSpec(hf=str(repo), format="parquet"))):
        os.environ["LLMFORGE_CACHE"] = str(work / f"cache-hub-{label[:4]}")
        start = time.perf_counter()
        src = prepare_source("bench", spec, work, tok)
        cold = time.perf_counter() - start
        print(f"tokenize   {written / 2**20:8.1f} MB in {cold:6.1f} s = {written / 2**20 / cold:6.1f} MB/s "
              f"({len(src.tokens) / cold / 1e6:.2f} M tokens/s, {src.documents:,} documents; {label}, "
              f"{os.cpu_count()} workers)")
    hub_chat(work, docs, size // 10)


def hub_chat(work: Path, docs: list[str], size: int) -> None:
    """Conversations as a Hub chat dataset ships them (a `messages` column of parquet shards),
    tokenized through the chat template in one process and in worker processes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmforge.text.chat import ChatTemplate

    template = ChatTemplate()
    sample = (p.read_text() for p in sorted((work / "sample").iterdir()))
    tok = Tokenizer.load(train_tokenizer(sample, work / "chat-tok", type="bpe", vocab_size=2048,
                                         sample_bytes=10 << 20, user_symbols=template.symbols))
    (work / "hub-chat").mkdir()
    rows, written, i = [], 0, 0
    while written < size:
        doc = docs[i % len(docs)]
        rows.append({"messages": [{"role": "user", "content": doc[:200] or "?"},
                                  {"role": "assistant", "content": doc[200:2200] or "."}]})
        written += len(doc[:2200].encode())
        i += 1
    pq.write_table(pa.Table.from_pylist(rows), work / "hub-chat/train-00000-of-00001.parquet")
    spec = SourceSpec(path=str(work / "hub-chat"), format="chat")
    entries = []
    for workers in (1, os.cpu_count()):
        os.environ["LLMFORGE_CACHE"] = str(work / f"cache-chat-{workers}")
        start = time.perf_counter()
        src = prepare_source("chat", spec, work, tok, workers=workers, template=template)
        cold = time.perf_counter() - start
        entries.append(np.asarray(src.tokens))
        print(f"tokenize   {written / 2**20:8.1f} MB of {len(rows):,} conversations in {cold:6.1f} s = "
              f"{written / 2**20 / cold:6.1f} MB/s (chat parquet through the chat template, {workers} "
              f"process{'es' if workers > 1 else ''})")
    print(f"           the same tokens either way: {np.array_equal(*entries)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="50M", help="corpus size for the throughput test (default 50M)")
    parser.add_argument("--scale", default=None, help="also measure memory on a corpus this big, e.g. 2G")
    parser.add_argument("--hub", default=None, help="also tokenize a Hub-style parquet dataset this big, e.g. 1G")
    parser.add_argument("--only-hub", action="store_true", help="with --hub: skip the other measurements")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmforge-bench-"))
    try:
        sample = work / "sample"
        make_corpus(sample, 10 << 20)
        tok_path = train_tokenizer((p.read_text() for p in sorted(sample.iterdir())), work / "tok",
                                   type="bpe", vocab_size=2048, sample_bytes=10 << 20)
        tok = Tokenizer.load(tok_path)
        print(f"machine    {os.cpu_count()} CPUs; tokenizer: sentencepiece bpe, 2048 tokens")
        if not args.only_hub:
            throughput(work, tok, parse_count(args.size))
        if args.hub:
            hub_style(work, tok, parse_count(args.hub))
        if args.scale:
            scale(work, tok_path, parse_count(args.scale))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
