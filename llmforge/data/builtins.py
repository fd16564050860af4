"""Built-in sources by name (data.<name>.builtin): data that ships with llmforge or is made by it,
with the format, split and held-out share it comes in. The world-* sources are one generated world
(world.py): facts to pretrain on, questions about them to fine-tune on, preference pairs and
prompts; their last 20% of examples are about people never trained on."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .world import ensure_world

# Folders of the standard library that are test fixtures or tooling rather than ordinary code
# (some hold deliberately broken files) or generated tables (codecs, pydoc topics); leaving them
# out keeps the built-in corpus ordinary, human-written code.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__",
                "encodings", "pydoc_data"}


@dataclass(frozen=True)
class Builtin:
    name: str
    settings: dict  # the data.<name> keys its data comes in (a recipe may repeat them, not contradict them)
    files: Callable[[], tuple[list[Path], Path]]  # (its files, the folder their order is taken relative to)


def _stdlib() -> tuple[list[Path], Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts)], root


def _world(file: str) -> Callable[[], tuple[list[Path], Path]]:
    def files() -> tuple[list[Path], Path]:
        folder = ensure_world()  # generated once into the cache
        return [folder / file], folder
    return files


BUILTINS: dict[str, Builtin] = {b.name: b for b in (
    Builtin("python-stdlib", {"format": "text"}, _stdlib),
    Builtin("world-facts", {"format": "text", "split": "paragraph"}, _world("facts.txt")),
    Builtin("world-chat", {"format": "chat", "val_fraction": 0.2}, _world("chat.jsonl")),
    Builtin("world-prefs", {"format": "preference", "val_fraction": 0.2}, _world("prefs.jsonl")),
    Builtin("world-questions", {"format": "prompt", "val_fraction": 0.2}, _world("questions.jsonl")),
)}
