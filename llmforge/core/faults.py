"""Fault injection, for the reliability tests (tests/test_faults.py): named moments of a run at
which a test can make the process fail for real.

Each moment has a key that names it the same way in every process: `step:01-pretrain:13` (after
step 13's update), `checkpoint:02-sft:20:model.safetensors` (that file written, the checkpoint
not yet renamed into place), `data:corpus:batch:0`, `tokenizer:chunk:8`, `reference:03-dpo:train/prefs:2`,
`final:01-pretrain:model.safetensors`. With LLMFORGE_FAULTS="key=action,..." the process, on
reaching a key, SIGKILLs itself (kill), sends itself SIGINT or SIGTERM (int, term: as a user's
Ctrl-C or a scheduler would).
LLMFORGE_FAULT_TRACE=path appends every key reached to that file, so a test learns the moments
of an uninterrupted run and picks from them. Unset (always, outside tests), `reached` is one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_FAULTS = dict(item.split("=", 1) for item in os.environ.get("LLMFORGE_FAULTS", "").split(",") if "=" in item)
_TRACE = os.environ.get("LLMFORGE_FAULT_TRACE")
ACTIVE = bool(_FAULTS or _TRACE)


def reached(*parts) -> None:
    """The run has reached the moment named by `parts` (joined with ':')."""
    if not ACTIVE:
        return
    key = ":".join(map(str, parts))
    if _TRACE:
        with open(_TRACE, "a") as f:
            f.write(key + "\n")
    action = _FAULTS.pop(key, None)  # each fault fires once per process
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("int", "term"):
        os.kill(os.getpid(), signal.SIGINT if action == "int" else signal.SIGTERM)
