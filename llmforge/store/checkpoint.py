"""Atomic safetensors checkpoints: complete or absent, never pickle.

A checkpoint folder `step-000500/` holds `model.safetensors`, `optimizer.safetensors` (the
optimizer state flattened to tensors, its hyperparameters as JSON metadata) and `state.json`
(stage, step, sampler state, RNG states, plan hash). It is written under a temporary name,
sealed and renamed into place (durable.py), so a kill -9 or a power cut at any moment leaves
either the old set or the new one; its `checksums.json`, taken at save time, finds one damaged
later (a truncated copy, a flipped bit) on resume: it is named and passed over for the one
before it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..core import durable, faults
from ..errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d+)$")
_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    """An optimizer state keyed by parameter name (distributed.full_state) -> safetensors tensors
    `state/<param>/<key>` + JSON metadata for the rest."""
    tensors, scalars = {}, {}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{name}/{key}"] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars), "keys": "names"}
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    if meta.get("keys") != "names":  # before distributed training: `state.<index>.<key>`
        for name, value in tensors.items():
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
        for name, value in json.loads(meta.get("scalars", "{}")).items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
        return {"state": state, "param_groups": json.loads(meta["param_groups"])}
    for name, value in tensors.items():
        _, param, key = name.split("/")
        state.setdefault(param, {})[key] = value
    for name, value in json.loads(meta.get("scalars", "{}")).items():
        param, key = name.split("/")
        state.setdefault(param, {})[key] = value
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


def by_name(state: dict, model, optimizer) -> dict:
    """An optimizer state keyed by parameter index (older checkpoints) re-keyed by name."""
    if all(isinstance(k, str) for k in state["state"]):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [g | {"params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def rng_state() -> dict:
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    def decode(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint saved where 8 GPUs were visible resumes on 4, or on 1: restore the devices
        # there are (set_rng_state_all would ask for device 4 and fail).
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(decode(s), i)


def save_checkpoint(root: Path, step: int, weights: dict, optimizer_state: dict, state: dict, keep: int) -> Path:
    """Write step-NNNNNN/ atomically under root, then keep only the newest `keep` checkpoints.
    weights and optimizer_state are full tensors keyed by name (distributed.full_state). A full
    disk is a clear error; the half-written folder is removed and the older checkpoints stand."""
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    moment = ("checkpoint", root.parent.name, step)  # for the fault-injection tests
    shutil.rmtree(tmp, ignore_errors=True)
    tensors, meta = _flatten_optimizer(optimizer_state)
    with durable.writing(tmp, final, sum(t.nbytes for t in (*weights.values(), *tensors.values()))):
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "model.safetensors"))
        faults.reached(*moment, "model.safetensors")
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
        faults.reached(*moment, "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(state | {"step": step, "rng": rng_state()}, indent=1))
        durable.seal(tmp)
    faults.reached(*moment, "sealed")
    durable.publish(tmp, final)
    faults.reached(*moment, "renamed")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path, note: Callable[[str], None]) -> tuple[Path, tuple] | None:
    """The newest checkpoint under root that is intact and loads: (its folder, read_checkpoint's
    result). A damaged one is named through `note` and passed over for the one before it; when
    checkpoints exist and none is intact, CheckpointError names them all."""
    found, problems = list_checkpoints(root), []
    for path in reversed(found):
        why = durable.damage(path)
        if why is None:
            try:
                return path, read_checkpoint(path)
            except CheckpointError as e:
                why = e.message.split(": ", 1)[-1]
        problems.append(f"{path.name}: {why}")
        note(f"checkpoint {path} is damaged: {why}; trying the one before it")
    if problems:
        raise CheckpointError(f"{root}: no intact checkpoint to resume from ({'; '.join(problems)})",
                              hint=f"delete {root} to train the stage again from its start (finished stages are "
                                   "kept), or use --restart to start the whole run over")
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders are never listed."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and all((p / f).is_file() for f in _FILES)]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(weights, optimizer state, state.json) of a checkpoint folder, as full CPU tensors."""
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "model.safetensors"))
        with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return weights, _unflatten_optimizer(tensors, meta), state
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot load checkpoint ({e})",
                              hint="delete that folder to resume from an older checkpoint, or use --restart")


def clean_temporary(root: Path) -> None:
    """Remove half-written folders and files left by a killed process."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
