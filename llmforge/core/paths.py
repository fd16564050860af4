"""Where llmforge keeps what it makes outside a run directory: the token cache, the generated
world's files, file fingerprints. LLMFORGE_CACHE moves it (the tests give each run its own)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("LLMFORGE_CACHE") or Path.home() / ".cache" / "llmforge")
