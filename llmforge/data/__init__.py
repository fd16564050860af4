"""Data: sources -> token cache (memory-mapped) -> weighted, resumable sampler."""

from .cache import PreparedSource, cache_dir, prepare_source
from .sampler import Sampler, eval_windows
from .sources import iter_documents, list_files

__all__ = ["PreparedSource", "Sampler", "cache_dir", "eval_windows", "iter_documents", "list_files",
           "prepare_source"]
