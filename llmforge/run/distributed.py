"""Many processes, one run, on PyTorch's own distributed engine.

`torch.distributed.run` (torchrun) starts the processes and sets RANK/WORLD_SIZE/...; this
module joins them into a process group, wraps the model (DDP, or FSDP2 `fully_shard` per
block), and provides the few agreements the engine needs: a setup step that succeeded
everywhere, a stop request every rank honors at the same step, the full state gathered for a
checkpoint. A single process is world size 1: the same calls, doing nothing.

Errors: rank 0 reports; a failure everyone shares (a bad checkpoint, say) is reported once by
rank 0, and a failure only one rank has reaches the user as "rank N: ...". A rank whose peer
died stops quietly: the peer's own message is the one that matters (or, when the peer was on
another machine, its launcher's: that machine was lost).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import inspect
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass, field

from ..errors import LlmforgeError, PeerFailed, PlanError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (they share its memory)
    control: object = field(default=None, repr=False)  # gloo group: CPU agreements, long timeout

    @property
    def main(self) -> bool:
        return self.rank == 0

    def together(self, fn):
        """Run fn on every rank and agree on the outcome: if any rank raised an LlmforgeError,
        rank 0 raises it (its own first) and the others raise PeerFailed. Also a barrier."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        result, error = None, None
        try:
            result = fn()
        except LlmforgeError as e:
            error = e
        errors = [None] * self.world
        dist.all_gather_object(errors, None if error is None else (str(error), error.hint), group=self.control)
        first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if first is None:
            return result
        if not self.main:
            raise PeerFailed()
        if error is not None:
            raise error
        rank, (message, hint) = first
        raise LlmforgeError(f"rank {rank}: {message}", hint)

    def same(self, value, what: str) -> None:
        """Fail (on every rank alike) unless all ranks hold the same value: ranks that planned
        or found different things would call different collectives and hang."""
        if self.world == 1:
            return
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value, group=self.control)
        odd = next((r for r, v in enumerate(values) if v != values[0]), None)
        if odd is not None:
            raise LlmforgeError(f"ranks disagree on {what}: rank 0 has {values[0]}, rank {odd} has {values[odd]}",
                                hint="every machine needs the same software, data and view of the run directory")

    def union(self, figures: dict) -> dict:
        """`figures` under the keys of every rank's, in one order (a key this rank lacks is 0): a
        step's figures are summed over ranks as one tensor, and a reward's named parts can differ by
        rank (a plugin that failed on every reply of one rank gave it none)."""
        if self.world == 1:
            return figures
        import torch.distributed as dist

        keys = [None] * self.world
        dist.all_gather_object(keys, list(figures), group=self.control)
        return {k: figures.get(k, 0.0) for k in dict.fromkeys(k for mine in keys for k in mine)}

    def stop_requested(self, signum: int) -> int:
        """The stop signal if any rank got one, so all stop (and save) at the same step."""
        if self.world == 1:
            return signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return int(flag.item())

    def all_sum(self, tensor):
        """Sum a tensor over ranks in place (a no-op alone)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def shard(self, batch: dict) -> dict:
        """This rank's contiguous share of a global batch's rows."""
        n = len(next(iter(batch.values()))) // self.world
        return {k: v[self.rank * n:(self.rank + 1) * n] for k, v in batch.items()}


def launched() -> bool:
    """Whether this process was started by torchrun (or torch.distributed.run)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init() -> Dist:
    """Join the process group torchrun described in the environment (world size 1 without it).
    nccl for CUDA tensors where there is a GPU, gloo for CPU ones."""
    if not launched():
        return Dist()
    import torch
    import torch.distributed as dist

    _die_with_parent()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if rank:
        warnings.simplefilter("ignore")  # rank 0 shows them once
    backend = "gloo"
    if torch.cuda.is_available():  # CUDA tensors over nccl, CPU ones (also runtime.device: cpu) over gloo
        torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    # Rank 0 may tokenize a large corpus while the others wait: give that wait hours, not minutes.
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))
    return Dist(rank, world, local, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), control)


def check_device(d: Dist, device_type: str) -> None:
    """One accelerator per process: more processes than GPUs would share (and overfill) them."""
    if d.world == 1:
        return
    if device_type == "mps":
        raise PlanError("runtime.device: mps cannot train with several processes",
                        hint="use one process, or runtime.device: cpu")
    if device_type == "cuda":
        import torch

        if d.local_world > torch.cuda.device_count():
            raise PlanError(f"--nproc-per-node: {d.local_world} processes per machine but "
                            f"{torch.cuda.device_count()} GPUs", hint=f"use --nproc-per-node {torch.cuda.device_count()}")


def close(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()  # without it, gloo's threads abort the exiting process


# A worker's exit code when it stops because another rank went away (sysexits' EX_TEMPFAIL: the
# same command will resume). It prints nothing: its launcher names the cause, a rank of its own
# that failed, or, when every failure it saw is this one, another machine.
PEER_LOST = 75


def peer_failure(e: BaseException) -> bool:
    """An error that only says another rank went away (its own error is what the user needs)."""
    import torch.distributed as dist

    lost = getattr(dist, "DistNetworkError", ())
    return isinstance(e, lost) or any(s in str(e) for s in ("closed by peer", "Connection reset by peer"))


def exit_now(code: int) -> None:
    """End a distributed worker at once. Tearing the process group down first would tell the
    peers before the launcher sees this exit code; the OS closes the connections as we die."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _die_with_parent() -> None:
    """If the launcher is killed (kill -9 leaves it no chance to stop us), die with it instead of
    training on as an orphan that holds the run directory. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# -- the model ---------------------------------------------------------------------------------

def wrap(model, mode: str, d: Dist, device, bf16: bool, compile: bool):
    """The module the training step calls: the model itself alone, DDP (every rank holds all
    weights, gradients all-reduced), or FSDP2 (weights, gradients and optimizer state sharded;
    each block's weights gathered just for its forward and backward). torch.compile, if asked,
    compiles each block in place, as torchtitan does: one small graph all blocks share (a block
    is a block), compiled in seconds, with FSDP2's hooks between blocks; the embeddings, head
    and chunked loss stay eager, and evals run eager (step.evaluate), so no second graph is
    compiled for them."""
    import torch

    if compile:
        for block in model.blocks:
            block.compile()
    if d.world == 1 or mode == "single":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        # The buffers (rope tables) are derived from the config, the same everywhere: no syncing.
        quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else {"broadcast_buffers": False}  # torch < 2.13
        return DDP(model, device_ids=ids, **quiet)
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    from torch.distributed.device_mesh import init_device_mesh

    # bf16 weights for compute and fp32 gradient reduction, on GPU (CPU trains in fp32). The
    # inputs between blocks (the residual stream, the rope tables) keep their dtype, as autocast
    # leaves them in a single process.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16 else MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (d.world,))  # the run's device, even on a GPU machine
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embeddings, final norm, head
    return model


@contextlib.contextmanager
def grad_sync(train_model, enabled: bool):
    """Synchronize gradients only on the last micro-batch of a step (DDP's no_sync; FSDP2's
    set_requires_gradient_sync): one all-reduce per optimizer step, not per micro-batch."""
    if hasattr(train_model, "no_sync") and not enabled:
        with train_model.no_sync():
            yield
        return
    if hasattr(train_model, "set_requires_gradient_sync"):
        train_model.set_requires_gradient_sync(enabled)
    yield


def full_state(model, optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) as full CPU tensors keyed by parameter name: the same layout
    whatever the world size and wrapping, so a checkpoint resumes anywhere. A collective under
    FSDP2; rank 0 gets the tensors, the others empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer(model, optimizer, state: dict) -> None:
    """Load a full optimizer state (as full_state gives it) into this rank's optimizer (sharded
    under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# -- the launcher ------------------------------------------------------------------------------

def launch(nproc: int, worker_args: list[str], nnodes: int = 1, endpoint: str | None = None) -> int:
    """`llmforge run ... --nproc-per-node N [--nnodes M --rdzv-endpoint host:port]`: become
    torchrun's elastic agent for N local workers running `python .../llmforge/__main__.py
    <worker_args>` (on each of M machines, which meet at the endpoint); return the exit code.
    Another machine lost is an LlmforgeError: one line, exit 2, and the user reruns."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import get_args_parser, run

    # Share the cores: torchrun would otherwise pin each worker to 1 thread, with a banner.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # On Ctrl-C/SIGTERM the workers finish their step and save: allow that 5 minutes, not 30 s.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    # The workers report their own errors; the agent's log lines and summary table repeat them.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    if nnodes > 1 and not endpoint:
        raise LlmforgeError(f"--nnodes {nnodes} needs --rdzv-endpoint",
                            hint="the same host:port on every machine, one of theirs: e.g. --rdzv-endpoint node0:29500")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "__main__.py")  # llmforge/
    meet = ["--standalone"] if nnodes == 1 else \
        ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "llmforge"]
    args = get_args_parser().parse_args(["--nproc-per-node", str(nproc), *meet, script, *worker_args])
    # Whichever notices first (this machine's ranks, or its agent), the news is the same.
    lost = LlmforgeError("lost contact with another machine of this run: it stopped or cannot be reached",
                         hint="its own output says why, if it could; run the same command again on every machine: "
                              "it resumes from the last complete checkpoint")
    try:
        run(args)
    except ChildFailedError as e:
        # Ranks that only lost a peer say nothing of the cause: look past them.
        failures = sorted(((r, f) for r, f in e.failures.items() if f.exitcode != PEER_LOST),
                          key=lambda kv: kv[1].timestamp)
        if not failures:  # the cause is on another machine, which reports it if it still can
            raise lost from None
        codes = [f.exitcode for _, f in failures]
        if 2 in codes:  # a user error, printed by the rank that had it
            return 2
        if any(c > 128 for c in codes):  # stopped by a signal after saving
            return next(c for c in codes if c > 128)
        rank, first = failures[0]
        if first.exitcode < 0:  # killed, e.g. by the out-of-memory killer: it could not tell
            name = signal.Signals(-first.exitcode).name
            print(f"error: rank {rank} was killed by {name}", file=sys.stderr)
            return 128 - first.exitcode
        return 1  # a bug: the rank printed its traceback
    except SignalException as e:  # the launcher was stopped; the workers saved (or were killed)
        return 128 + e.sigval
    except RendezvousTimeoutError:
        raise LlmforgeError(f"--nnodes {nnodes}: not every machine came to the rendezvous at {endpoint} in time",
                            hint="start the same command on every machine, with the same --rdzv-endpoint") from None
    except RendezvousError:  # the store the agents meet at went with the machine that hosted it
        raise lost from None
    return 0
