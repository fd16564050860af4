"""A stage's final/ folder, the one module that writes it and reads it back: the loadable model
(model.safetensors, config.json with the architecture and how it was trained, the tokenizer's
files, eval.json; an adapter's adapter.safetensors), written aside and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..core import durable, faults
from ..errors import CheckpointError
from ..model.transformer import ModelConfig, Transformer
from ..model.weights import load_weights
from ..text.chat import ChatTemplate
from ..text.templates import template_from_spec
from ..text.tokenizer import Tokenizer
from ..text.tokenizer_json import load_tokenizer


def find_stage(run_dir: Path, stage: str | None) -> Path:
    """The final/ folder of the named stage, or of the last finished one."""
    stages = run_dir / "stages"
    done = sorted(p for p in stages.glob("*/final") if (p / "model.safetensors").is_file()) \
        if stages.is_dir() else []
    if not done:
        raise CheckpointError(f"{run_dir}: no finished stage to load",
                              hint="run `llmforge run RECIPE` first, or point at another run directory")
    if stage is None:
        return done[-1]
    for p in done:
        if p.parent.name.split("-", 1)[-1] == stage or p.parent.name == stage:
            return p
    names = ", ".join(p.parent.name.split("-", 1)[-1] for p in done)
    raise CheckpointError(f"{run_dir}: no finished stage named {stage!r} (finished: {names})",
                          hint="pass one of those to --stage")


def read_model_config(final: Path) -> ModelConfig:
    """The architecture a stage's final/ folder was trained with."""
    try:
        return ModelConfig.from_dict(json.loads((final / "config.json").read_text())["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{final}: cannot read the model's config.json ({e})",
                              hint="the stage's final folder is damaged; run the recipe again to rebuild it")


def check_language_model(final: Path) -> None:
    """Refuse a stage whose model does not write text (a reward model scores it)."""
    config = json.loads((final / "config.json").read_text())
    if config.get("language_model") is False:
        raise CheckpointError(f"{final}: stage {config.get('stage')!r} trained a {config.get('kind')} model, "
                              "which scores replies and cannot write them",
                              hint="use a stage that trains a language model (--stage), or `llmforge eval` it")


def load_model(final: Path, build=Transformer, device="cpu", language_model: bool = False):
    """A stage's final weights in the model `build` makes of its config, on device, in eval mode;
    with language_model, a stage whose model does not write text is refused."""
    cfg = read_model_config(final)
    if language_model:
        check_language_model(final)
    model = build(cfg)
    load_weights(model, final / "model.safetensors")
    return model.to(device).eval()


def load_trained(final: Path, device: str = "cpu") -> tuple[Transformer, Tokenizer]:
    """A stage's language model, ready to generate, and its tokenizer."""
    return load_model(final, Transformer, device, language_model=True), load_tokenizer(final)


def final_template(final: Path) -> ChatTemplate | None:
    """The chat template a stage was trained with (None if its recipe had none)."""
    try:
        spec = json.loads((final / "config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return template_from_spec(spec)


def chat_template(final: Path) -> ChatTemplate:
    """The chat template a stage was trained with, which chatting with it needs."""
    template = final_template(final)
    if template is None:
        raise CheckpointError(f"{final.parent.name} was trained without a chat template",
                              hint="chat needs a recipe with tokenizer.chat_template and an sft stage; "
                                   "use `llmforge sample` to continue plain text")
    return template


def write_final(final: Path, weights: dict, config: dict, results: dict, files: dict[str, bytes],
                adapter: dict | None = None) -> None:
    """The stage's loadable model: weights, config.json (`config`), the tokenizer's `files` and its
    final eval results, renamed into place at once; with an adapter, also adapter.safetensors
    (what `export --adapter` writes as PEFT's; config["adapter"] says which weights it updates)."""
    tmp = final.parent / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with durable.writing(tmp, final, sum(t.nbytes for t in (*weights.values(), *(adapter or {}).values()))):
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "model.safetensors"))
        faults.reached("final", final.parent.name, "model.safetensors")
        if adapter is not None:
            save_file(adapter, str(tmp / "adapter.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "eval.json").write_text(json.dumps(results, indent=1))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        durable.seal(tmp)
    faults.reached("final", final.parent.name, "sealed")
    durable.publish(tmp, final)


