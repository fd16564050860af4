"""Where llmforge keeps what it makes outside a run directory: the token cache, the generated
world's files, file fingerprints. LLMFORGE_CACHE moves it (the tests give each run its own)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("LLMFORGE_CACHE") or Path.home() / ".cache" / "llmforge")


def recipe_path(base_dir: Path, path: str | Path) -> Path:
    """A path a recipe names: ~ expanded (user_path), relative to the recipe's folder unless absolute
    (joining an absolute path keeps it as it is)."""
    return base_dir / user_path(path)


def user_path(path: str | Path) -> Path:
    """A path as a user wrote it, ~ and ~user expanded; one naming no known user (`~0`) stays as
    written, so it is reported as a path that is not there rather than raising."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory"
        return Path(path)
