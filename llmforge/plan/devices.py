"""Devices: the one table of GPUs llmforge knows (memory, dense bf16 peak, interconnect), read
both by `detect_device` (this machine: its peak, for MFU) and by `llmforge plan --target h100x8`
(hardware you don't have, so a run is sized before the GPUs are rented). The table is
docs/targets.md's; figures are vendor datasheets' (dense, no sparsity), and times assume the MFU
stated here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import PlanError

# Model FLOPs utilization assumed for wall-time estimates on a GPU: what a well-tuned dense
# transformer step reaches on these parts (nanoGPT and torchtitan report ~35-50% in bf16).
ASSUMED_MFU = 0.4
# Between machines (--nnodes > 1): one 400 Gb/s InfiniBand/RoCE link per GPU, as cloud H100/A100
# nodes have; ~50 GB/s each way.
INTER_NODE_BYTES_PER_S = 50e9


@dataclass(frozen=True)
class Device:
    type: str  # cpu | cuda | mps
    name: str
    memory_bytes: int
    precision: str  # fp32 | bf16 | fp16
    compile: bool
    threads: int
    peak_flops: float | None  # dense FLOP/s at `precision`; None when unknown
    link_bytes_per_s: float | None = None  # between devices, each way (known for a --target only)


@dataclass(frozen=True)
class Target:
    key: str
    name: str
    match: str  # what torch.cuda.get_device_name() says of it (the first entry that matches wins)
    memory_gb: float  # per device, decimal GB as sold
    peak_tflops: float  # dense bf16 tensor-core peak
    link: str  # between the devices of one machine
    link_gb_per_s: float  # per device, each way


TARGETS = {t.key: t for t in (
    Target("h100", "NVIDIA H100 SXM 80GB", "H100", 80, 989, "NVLink 4", 450),
    Target("h200", "NVIDIA H200 SXM 141GB", "H200", 141, 989, "NVLink 4", 450),
    Target("a100-80g", "NVIDIA A100 SXM 80GB", "A100", 80, 312, "NVLink 3", 300),
    Target("a100-40g", "NVIDIA A100 SXM 40GB", "A100", 40, 312, "NVLink 3", 300),
    Target("l40s", "NVIDIA L40S 48GB", "L40S", 48, 362, "PCIe 4.0 x16", 32),
    Target("4090", "NVIDIA GeForce RTX 4090 24GB", "4090", 24, 165, "PCIe 4.0 x16", 32),
    Target("a10", "NVIDIA A10 24GB", "A10", 24, 125, "PCIe 4.0 x16", 32),  # after A100: "A10" is in its name
)}


def detect_device(runtime, processes: int = 1) -> Device:
    """This machine's device for one process, when `processes` share the machine (on CPU they
    share its memory; on GPUs each has its own)."""
    import torch

    kind = runtime.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise PlanError("runtime.device: cuda was asked for but no CUDA device is available",
                        hint="use runtime.device=auto or cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise PlanError("runtime.device: mps was asked for but is not available", hint="use auto or cpu")
    threads = runtime.threads if runtime.threads != "auto" else torch.get_num_threads()
    if kind == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, memory = props.name, props.total_memory
        # fp16 would need loss scaling; GPUs without bf16 train in fp32 (with TF32 where there is one).
        auto_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    else:
        name = "Apple GPU" if kind == "mps" else f"CPU ({threads} threads)"
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // processes
        auto_precision = "fp32"  # autocast on CPU is slower than fp32 for small models
    precision = auto_precision if runtime.precision == "auto" else runtime.precision
    if precision == "fp16":
        raise PlanError("runtime.precision: fp16 is not supported yet (it needs loss scaling)",
                        hint="use bf16 where the device has it, else fp32")
    compile_on = runtime.compile == "on" or (runtime.compile == "auto" and kind == "cuda")
    return Device(kind, name, memory, precision, compile_on, threads, peak_flops(kind, name, precision))


def peak_flops(kind: str, name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU by its name, from the table; None for CPUs and GPUs not in it."""
    if kind != "cuda":
        return None
    peak = next((t.peak_tflops * 1e12 for t in TARGETS.values() if t.match in name), None)
    return peak and (peak if precision != "fp32" else peak / 2)  # TF32 is about half of bf16


def parse_target(text: str) -> tuple[str, int]:
    """'h100x8' -> ('h100', 8); 'cpu' and a bare name mean one device."""
    m = re.fullmatch(r"([a-z0-9-]+?)(?:x(\d+))?", text.strip().lower())
    known = ", ".join([*TARGETS, "cpu"])
    if not m or (m.group(1) not in TARGETS and m.group(1) != "cpu"):
        raise PlanError(f"--target: unknown device {text!r} (known: {known}; add xN for N of them, e.g. h100x8)",
                        hint="docs/targets.md lists each device's memory, peak and interconnect")
    count = int(m.group(2) or 1)
    if not 1 <= count <= 64 or (m.group(1) == "cpu" and count > 1):
        raise PlanError(f"--target: {text!r}: a machine holds 1 to 64 devices (cpu: one)",
                        hint="for several machines add --nnodes N, e.g. --target h100x8 --nnodes 4")
    return m.group(1), count


def target_device(key: str, runtime, nnodes: int = 1):
    """The plan's Device for a named target (cpu: this machine's CPU, its speed measured)."""
    if key == "cpu":
        return detect_device(runtime.model_copy(update={"device": "cpu"}))
    t = TARGETS[key]
    if runtime.precision == "fp16":
        raise PlanError("runtime.precision: fp16 is not supported yet (it needs loss scaling)",
                        hint="use bf16 where the device has it, else fp32")
    precision = "bf16" if runtime.precision == "auto" else runtime.precision
    peak = t.peak_tflops * 1e12 * (0.5 if precision == "fp32" else 1.0)  # TF32 is about half of bf16
    link = min(t.link_gb_per_s * 1e9, INTER_NODE_BYTES_PER_S) if nnodes > 1 else t.link_gb_per_s * 1e9
    return Device("cuda", f"{t.name} (target)", int(t.memory_gb * 1e9), precision, runtime.compile != "off",
                  1, peak, link)


def plan_target(text: str, runtime, nnodes: int = 1):
    """(the Device, devices per machine, the line saying what was assumed) of `--target TEXT`."""
    key, count = parse_target(text)
    return target_device(key, runtime, nnodes), count, describe(key, count, nnodes)


def describe(key: str, count: int, nnodes: int) -> str:
    if key == "cpu":
        return "target cpu: this machine's CPU (its speed measured now)"
    t = TARGETS[key]
    nodes = (f" per machine x {nnodes} machines (between them {INTER_NODE_BYTES_PER_S / 1e9:.0f} GB/s a GPU)"
             if nnodes > 1 else "")
    return (f"target {key}x{count}{nodes}: {t.name}, {t.memory_gb:g} GB, {t.peak_tflops:g} TFLOPS bf16 dense, "
            f"{t.link} {t.link_gb_per_s:g} GB/s each way; times assume {ASSUMED_MFU:.0%} MFU")


def table() -> str:
    """The device table as Markdown (docs/targets.md holds it; a test keeps the two the same)."""
    rows = ["| target | device | memory (GB) | bf16 dense TFLOPS | interconnect, per device each way |",
            "|---|---|---|---|---|"]
    rows += [f"| `{t.key}` | {t.name} | {t.memory_gb:g} | {t.peak_tflops:g} | {t.link}, {t.link_gb_per_s:g} GB/s |"
             for t in TARGETS.values()]
    return "\n".join(rows) + "\n"
