"""Weights in and out of a model: which tensors a checkpoint stores, loading saved tensors by name,
and the bare module under torch.compile's and DDP's wrappers."""

from __future__ import annotations

import contextlib
import functools

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError


def weight_names(model: torch.nn.Module) -> list[str]:
    """The state_dict names a checkpoint stores: each shared tensor once (tied embeddings are
    stored as tok_emb only). Asked of the model before DDP/FSDP wrap it."""
    out, seen = [], set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out.append(name)
    return out


def load_weights(model: torch.nn.Module, path: Path, fresh: tuple[str, ...] = ()) -> None:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})",
                              hint="the file is damaged; delete that checkpoint folder to use an older one")
    set_weights(model, tensors, path, fresh)


def set_weights(model: torch.nn.Module, tensors: dict, path: Path, fresh: tuple[str, ...] = ()) -> None:
    """Load saved tensors into a (not yet wrapped) model; path names them in errors. Weights
    named in `fresh` may be missing and keep their initial values (a reward model's scalar head,
    starting from a language model)."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied tensor saved under one name is loaded under all of them.
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in tensors if k in state}
    missing = [m for m in missing if state[m].data_ptr() not in loaded and m not in fresh]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})", hint="the recipe's model differs from the saved one")


def unwrap(model):
    """The bare module under torch.compile's and DDP's wrappers (FSDP2 shards it in place)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def eager():
    """Compiled blocks run eagerly inside: evals and generation are forwards without gradients
    in shapes training never sees (a decode step per token), not worth graphs of their own
    (torch >= 2.6; before it they go through the compiled blocks)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()


def run_eager(fn):
    """fn, its calls inside eager()."""
    @functools.wraps(fn)
    def eagerly(*args, **kwargs):
        with eager():
            return fn(*args, **kwargs)
    return eagerly
