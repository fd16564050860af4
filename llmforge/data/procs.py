"""Worker processes that tokenize a source in parallel: documents (cache.py) and conversations
(example_cache.py) alike. Each worker keeps its own tokenizer (and chat template), set once by the
pool's initializer; results come back in submission order, so a cache entry is the same whatever
the number of workers."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

# What a worker process tokenizes with, set by _init.
TOKENIZER = None
TEMPLATE = None


def default_workers(tokenizer) -> int:
    """A tokenizer.json encodes a batch on every core itself (measured on 2 cores: 2.6 MB/s in one
    process vs 2.4 MB/s in two, benchmarks/data.py); sentencepiece needs worker processes."""
    return 1 if getattr(tokenizer, "encodes_in_parallel", False) else cores()


def pool(tokenizer, workers: int, template=None):
    """Worker processes for tokenizing, or a no-op context when one process is enough."""
    if workers <= 1:
        return contextlib.nullcontext(None)
    # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init, initargs=(tokenizer, template))


def cores() -> int:
    """CPUs this process may use (a container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_of_this_rank() -> int:
    """This process's share of the CPUs when torchrun started several training processes on this
    machine (its LOCAL_WORLD_SIZE): pools that each took them all would fight over them."""
    return max(1, cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _init(tokenizer, template=None, threads: int = 1) -> None:
    global TOKENIZER, TEMPLATE
    threading.Thread(target=exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    tokenizer._threads = threads  # one thread per worker process: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the same for a tokenizer.json's Rust threads
    TOKENIZER, TEMPLATE = tokenizer, template


def exit_when_orphaned(parent: int) -> None:
    """A pool worker holds both ends of its task queue, so when the run is killed (kill -9, OOM) it
    never sees the queue close: it would wait forever, holding the terminal's pipes open."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
