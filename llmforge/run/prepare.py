"""From a validated recipe to a ready-to-run engine Context: run directory checks, tokenizer,
data preparation and the plan. Also the cheap plan-only path behind `llmforge plan`."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path

import yaml

from ..core.paths import recipe_path
from ..data.cache import find_source, prepare_source
from ..data.formats import FORMATS
from ..data.pieces import iter_documents
from ..data.sources import NoFiles, list_files
from ..errors import CheckpointError, PlanError, RecipeError, TokenizerError
from ..model.hf import check_weights
from ..plan.devices import Device, detect_device
from ..plan.estimates import HANDS_BACK
from ..plan.mix import SourceStats
from ..plan.plan import Plan, compile_plan, model_config
from ..recipe.loader import diff_recipes
from ..recipe.schema import Recipe, dump_recipe
from ..stages import KINDS
from ..text.templates import template_from_spec
from ..text.tokenizer import train_tokenizer
from ..text.tokenizer_json import load_tokenizer, tokenizer_file, train_bytelevel_bpe
from .distributed import Dist, check_device
from .engine import Context
from .resolve import resolve_formats

# Recipe keys that change how a run is watched or saved, never what it computes.
_HARMLESS = (".eval.", ".checkpoint.")


def prepare_run(recipe: Recipe, run_dir: Path, reporter, restart: bool = False, dist: Dist | None = None) -> Context:
    """Everything before training: run directory, tokenizer, token cache, plan. In a distributed
    run rank 0 does the work; the others then find it done (they write nothing to the run dir)."""
    dist = dist or Dist()
    recipe, notes = resolve_formats(recipe)
    follower = not dist.main
    if follower and tokenizer_file(run_dir / "tokenizer") is None:
        raise RecipeError([f"{run_dir}: rank {dist.rank} does not see the run directory rank 0 prepared"],
                          hint="on several machines, the run directory must be on a filesystem all of them share")
    device = detect_device(recipe.runtime, processes=dist.local_world)
    check_device(dist, device.type)
    if e := _weights_problem(recipe):  # `plan` sizes a run before the weights are at hand; `run` needs them now
        raise CheckpointError(f"model.init.hf: {e.message}", hint=e.hint or "copy the model's weights there, "
                              "or point model.init.hf at a folder that has them")
    lock = None
    if not follower:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run_dir(run_dir)
        if restart:
            clear_run_dir(run_dir)
        check_run_dir(recipe, run_dir)
        _write_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
        # Where relative data paths point: `llmforge eval` reads the run's data without the recipe file.
        _write_atomic(run_dir / "run.json", json.dumps({"base_dir": str(recipe.base_dir.resolve())}))
    _set_threads(device.threads)
    tokenizer = load_tokenizer(run_dir / "tokenizer") if follower else ensure_tokenizer(recipe, run_dir, reporter)
    template = recipe_template(recipe)
    workers = None if recipe.runtime.data_workers == "auto" else recipe.runtime.data_workers
    sources = {}
    for name in used_sources(recipe):
        spec = recipe.data[name]
        with reporter.task(f"tokenizing {name}", _source_bytes(recipe, name)) as advance:
            sources[name] = prepare_source(name, spec, recipe.base_dir, tokenizer, advance, workers, template,
                                           reporter.note)
    # Huge pages (_return_freed_memory says why) for a model whose state alone passes HANDS_BACK; set
    # before torch's first allocation, which reads it once: the plan's matmul timing.
    if device.type == "cpu" and model_config(recipe, tokenizer.vocab_size).num_params() * 16 > HANDS_BACK:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    plan = compile_plan(recipe, vocab_size=tokenizer.vocab_size, world_size=dist.world,
                        sources={n: source_stats(s) for n, s in sources.items()}, device=device,
                        tokenizer_fingerprint=tokenizer.fingerprint, previews=previews(recipe), run_dir=run_dir,
                        notes=notes)
    if not follower:
        _write_atomic(run_dir / "plan.json", json.dumps(plan.to_json(), indent=1))
    if device.type == "cpu" and max((sp.est_peak_memory_bytes for sp in plan.stages), default=0) > HANDS_BACK:
        _return_freed_memory()
    return Context(plan, run_dir, tokenizer, sources, template=template, reporter=reporter, lock=lock, dist=dist)


def source_stats(src) -> SourceStats:
    if hasattr(src, "per_example"):  # conversations: token counts of the splits' sequences
        train, val = src.train, src.val
        return SourceStats(src.documents, int(train.offsets[-1] - train.offsets[0]),
                           int(val.offsets[-1] - val.offsets[0]), skipped=src.skipped, filtered=src.filtered,
                           reasons=src.reasons,
                           examples=train, val_examples=val)
    return SourceStats(src.documents, len(src.train), len(src.val), skipped=src.skipped, filtered=src.filtered,
                       reasons=src.reasons)


def lock_run_dir(run_dir: Path):
    """One process per run directory: a second `run` on it would fight over its checkpoints.
    The OS drops the lock when the process ends, however it ends."""
    handle = open(run_dir / ".lock", "a+")
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows: no advisory locks; run without one
        pass
    except OSError:
        handle.close()
        raise RecipeError([f"{run_dir}: another llmforge process is running in this run directory"],
                          hint="wait for it to finish, stop it, or use --run-dir DIR for a separate run")
    return handle


def clear_run_dir(run_dir: Path) -> None:
    """--restart: delete a previous run, but only something that looks like one."""
    entries = [p for p in run_dir.iterdir() if p.name != ".lock"]
    if entries and not any((run_dir / n).exists() for n in ("recipe.yaml", "plan.json", "stages", "tokenizer")):
        raise RecipeError([f"{run_dir}: not an llmforge run directory; --restart will not delete it"],
                          hint="pick an empty folder or a previous run's folder with --run-dir")
    for p in entries:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


PLAN_TOKENIZES = 64 * 2**20  # conversation sources up to this size are tokenized by `plan` itself


def estimate_plan(recipe: Recipe, run_dir: Path, world_size: int = 1, processes: int = 1,
                  device: Device | None = None) -> Plan:
    """The plan without training anything: exact token counts where the run directory's tokenizer
    and the cache already have them, estimates from file sizes otherwise. processes: how many
    share this machine; device: another machine's (--target), else this one's."""
    target, device = device is not None, device or detect_device(recipe.runtime, processes=processes)
    recipe, notes = resolve_formats(recipe, planning=True)
    if not target or device.type == "cpu":  # a GPU target's thread count is nothing to set here
        _set_threads(device.threads)
    tok_path = tokenizer_file(run_dir / "tokenizer")
    tokenizer = load_tokenizer(tok_path) if tok_path else None
    if tokenizer is None and recipe.tokenizer.path:
        tokenizer = load_tokenizer(_resolve(recipe, recipe.tokenizer.path))
    stats = {}
    template = recipe_template(recipe)
    if tokenizer is not None and template is not None:
        template.stop_ids(tokenizer)  # a template's tokens the tokenizer lacks: an error now, not in a stage
    for name in used_sources(recipe):
        spec = recipe.data[name]
        if tokenizer and (src := find_source(name, spec, recipe.base_dir, tokenizer, template)):
            stats[name] = source_stats(src)
        elif tokenizer and template and FORMATS[spec.format].conversations and \
                _source_bytes(recipe, name) <= PLAN_TOKENIZES:
            # Small conversation data is tokenized now (into the cache `run` reads): the plan then
            # knows each example's length, which derives seq_len and says what is dropped or cut.
            stats[name] = source_stats(prepare_source(name, spec, recipe.base_dir, tokenizer, template=template))
        else:
            try:
                files = list_files(name, spec, recipe.base_dir)
            except NoFiles as e:  # sizing a run comes before downloading its data: plan without it
                stats[name] = SourceStats(None, 0, 0, estimated=True, missing=e.message)
                continue
            size = _source_bytes(recipe, name, files)
            # ~3.5 bytes per token for a subword vocab of a few thousand on English or code; 1 for chars.
            tokens = int(size / (1.0 if recipe.tokenizer.type == "char" and not recipe.tokenizer.path else 3.5))
            val = int(tokens * spec.val_fraction)
            stats[name] = SourceStats(len(files), tokens - val, val, estimated=True,
                                      conversations=FORMATS[spec.format].conversations)
    vocab = tokenizer.vocab_size if tokenizer else recipe.tokenizer.vocab_size
    return compile_plan(recipe, vocab_size=vocab, sources=stats, device=device, world_size=world_size,
                        tokenizer_fingerprint=tokenizer.fingerprint if tokenizer else None, previews=previews(recipe),
                        warnings=[f"model.init.hf: {e.message}; the plan sizes the run from its config.json, and "
                                  "`run` needs them" for e in [_weights_problem(recipe)] if e],
                        run_dir=None if target else run_dir,  # this disk says nothing of another machine's
                        notes=notes)


def _weights_problem(recipe: Recipe) -> CheckpointError | None:
    """Why model.init.hf's weights cannot be read (None when they can, or with no model.init.hf):
    `run` refuses it, `plan` warns (sizing comes before downloading)."""
    try:
        recipe.model.init and check_weights(Path(recipe.model.init.hf))
    except CheckpointError as e:
        return e
    return None


def previews(recipe: Recipe) -> dict:
    """For each stage on chat data, its first source's first example rendered by the chat
    template, with the learned spans marked (a dpo pair shows the chosen reply, then the rejected)."""
    from ..data.formats import read_examples
    from ..data.sources import Skips, SourceReport

    template = recipe_template(recipe)
    if template is not None and (problems := [p for i, stage in enumerate(recipe.stages) for p in KINDS[stage.kind]
                                              .template_problems(f"stages[{i}]", stage.options, template)]):
        raise PlanError("\n".join(problems), hint="see docs/rl.md")
    out = {}
    for stage in recipe.stages:
        if not KINDS[stage.kind].chat or template is None:
            continue
        name = next(iter(stage.mix))
        spec = recipe.data[name]
        example = None
        try:
            files = list_files(name, spec, recipe.base_dir)
        except NoFiles:  # not at hand yet: the plan says so
            continue
        for path in files:
            example = next(iter(read_examples(path, spec, SourceReport(name, spec, Skips()))), None)
            if example:
                break
        if example is None:
            continue
        segments = KINDS[stage.kind].preview(template, example[1], stage.options)
        if segments:
            out[stage.name] = segments
    return out


def recipe_template(recipe: Recipe):
    """The recipe's chat template (tokenizer.chat_template), or None."""
    return template_from_spec(recipe.tokenizer.chat_template, recipe.base_dir)


def used_sources(recipe: Recipe) -> list[str]:
    names = [n for stage in recipe.stages for n in stage.mix]
    return list(dict.fromkeys(names))


def check_run_dir(recipe: Recipe, run_dir: Path) -> None:
    """Refuse a recipe change that would alter work already done in this run directory.

    Top-level sections (seed, tokenizer, model, data) feed every stage; a stage's own keys only
    matter once that stage has started. Stages may be appended; runtime keys may change.
    """
    old_file = run_dir / "recipe.yaml"
    if not old_file.is_file():
        return
    old = yaml.safe_load(old_file.read_text())
    new = recipe.model_dump(mode="json")
    old_stages, new_stages = old.pop("stages", []), new.pop("stages")
    started = [i for i, st in enumerate(old_stages) if (run_dir / "stages" / f"{i + 1:02d}-{st['name']}").exists()]
    if not started:
        return
    problems = [f"{path}: changed from {a!r} to {b!r} since {run_dir} started (work has already been done "
                "with the old value)" for path, a, b in diff_recipes(old, new) if not path.startswith("runtime.")]
    for i in started:
        name = old_stages[i]["name"]
        if i >= len(new_stages):
            problems.append(f"stages[{i}]: stage {name!r} was removed, but it has already trained")
            continue
        for path, a, b in diff_recipes(old_stages[i], new_stages[i], ("stages", i)):
            if not any(k in path for k in _HARMLESS):
                problems.append(f"{path}: changed from {a!r} to {b!r} since {run_dir} started "
                                f"(stage {name!r} has already trained)")
    if problems:
        raise RecipeError(problems, hint="run with --restart to start over, or --run-dir DIR for a new run")


def ensure_tokenizer(recipe: Recipe, run_dir: Path, reporter):
    """The run's tokenizer: already in the run directory (if built from the same settings),
    copied from a file, or trained."""
    out = run_dir / "tokenizer"
    spec = recipe.tokenizer
    template = recipe_template(recipe)
    names = spec.train_on or used_sources(recipe)
    source = _resolve(recipe, spec.path) if spec.path else None
    settings = json.dumps({"spec": spec.model_dump(mode="json", exclude={"train_on"}), "train_on": names,
                           "file": hashlib.sha256(source.read_bytes()).hexdigest() if source else None})
    old = _read(out / "settings.json")
    if tokenizer_file(out) and old == settings:
        return load_tokenizer(out)
    stages = run_dir / "stages"
    if old is not None and stages.is_dir() and any(stages.iterdir()):
        # Trained weights read ids as the tokens they were trained on: never swap them out.
        was = json.loads(old).get("train_on")
        raise RecipeError([f"tokenizer: {run_dir} trained with a tokenizer built from other settings "
                           f"(it was trained on sources {was}, now it would be {names})"],
                          hint=f"set tokenizer.train_on: {was} to keep it (e.g. after adding a stage), "
                               "or use --restart to start over")
    for stale in ("tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json"):
        (out / stale).unlink(missing_ok=True)  # a tokenizer of the other kind must not be found first
    if source:
        tokenizer = load_tokenizer(source)  # fails clearly on a broken file, before copying it
        out.mkdir(parents=True, exist_ok=True)
        for name, data in tokenizer.files.items():
            _write_atomic(out / name, data)
    else:
        share = spec.sample_bytes // len(names)
        # An equal share of the sample from each source, so a small source still shapes the vocab,
        # and never from a source's held-out tail (its last val_fraction), which eval must not leak.
        docs = itertools.chain.from_iterable(
            _take_bytes(iter_documents(n, recipe.data[n], recipe.base_dir), min(share, _train_bytes(recipe, n)))
            for n in names)
        symbols = template.symbols if template else ()
        with reporter.task(f"training {spec.type} tokenizer ({spec.vocab_size} tokens)", None):
            if spec.type == "bytelevel_bpe":
                train_bytelevel_bpe(docs, out, vocab_size=spec.vocab_size, sample_bytes=spec.sample_bytes,
                                    specials=symbols)
            else:
                train_tokenizer(docs, out, type=spec.type, vocab_size=spec.vocab_size,
                                byte_fallback=spec.byte_fallback, sample_bytes=spec.sample_bytes, user_symbols=symbols)
    tokenizer = load_tokenizer(out)
    if template is not None:
        template.stop_ids(tokenizer)  # a loaded tokenizer without the chat tokens fails here, clearly
        for symbol in template.symbols:
            tokenizer.special_id(symbol)
    _write_atomic(out / "settings.json", settings)  # last: a kill before this means "build again"
    return tokenizer


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _source_bytes(recipe: Recipe, name: str, files: list[Path] | None = None) -> int:
    """The bytes a source will be read from: its files' sizes, capped by max_bytes."""
    spec = recipe.data[name]
    size = sum(p.stat().st_size for p in files or list_files(name, spec, recipe.base_dir))
    return min(size, spec.max_bytes or size)


def _train_bytes(recipe: Recipe, name: str) -> int:
    """About how many bytes of a source come before its held-out tail (file sizes: compressed
    files make this an underestimate, which errs on the safe side)."""
    return max(1, int(_source_bytes(recipe, name) * (1 - recipe.data[name].val_fraction)))


def _take_bytes(docs, budget: int):
    """The first `budget` UTF-8 bytes of the documents (the last one cut short)."""
    for doc in docs:
        size = len(doc.encode("utf-8"))
        if size >= budget:
            yield doc.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
            return
        budget -= size
        yield doc


def _resolve(recipe: Recipe, path: str) -> Path:
    p = recipe_path(recipe.base_dir, path)
    if not os.path.isfile(p):  # os.path, unlike Path, says False for a name too long to stat
        what = "is a directory" if os.path.isdir(p) else "does not exist"
        raise TokenizerError(f"tokenizer.path: {p} {what}",
                             hint="give the path of a sentencepiece .model file or a tokenizer.json")
    return p


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _return_freed_memory() -> None:
    """Blocks of 256 KiB and up (every activation of a real model) get their own pages from the OS
    and go back to it when freed. glibc's default threshold climbs to 32 MiB as large blocks are
    freed, and below it freed tensors stay in the heap in pieces of every size (trimmed rows make
    every micro-batch's differ), so a CPU run's resident memory grew well past what it held
    (benchmarks/scale.py, Qwen2.5-0.5B's shape, 2,048 tokens: peak 12.5 -> 11.5 GiB; grpo's stage
    of benchmarks/estimates.py on a 26M model: 2.0 -> 1.3 GB).
    Each fresh block faults its pages in, 4 KiB at a time: 5-9 s of a 30 s checkpointed step at
    that shape. So a large model's CPU run asks torch's allocator (prepare_run, THP_MEM_ALLOC_ENABLE)
    for transparent huge pages for its blocks of 2 MiB and up, which fault 2 MiB at a time: the
    step then ran as fast as under glibc's default (side by side, 4 steps each: 27-31 s against
    30-31 s, and 35 s with 4 KiB pages) and kept the memory saving (8.8 GiB against 9.9). A small
    model still pays for the faults of its blocks under 2 MiB (at n_embd 192 they cost the
    quickstart's pretrain ~40% of its tokens/s), so runs planned under HANDS_BACK skip this, and
    huge pages would round its few 2 MiB blocks up (quickstart's pretrain: 277 -> 299-310 MiB).
    Linux only: elsewhere torch reads no such variable and glibc's mallopt is not there."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError, TypeError):  # not glibc (macOS): its allocator keeps its own ways
        pass


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _write_atomic(path: Path, content: str | bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)
