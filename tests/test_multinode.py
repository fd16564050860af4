"""Several machines, for real: two launchers on 127.0.0.1 (two "machines" sharing the run
directory, as machines share it over NFS), each with `--nnodes 2 --nproc-per-node 1`, meet through
torchrun's c10d rendezvous and train exactly as one machine of two processes does, bit for bit.
A machine lost mid-run ends the other's command with exit 2 and one line saying so, and the same
commands resume the run from its last checkpoint, again bit for bit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import cli
from .test_distributed import RUN, STAGES, losses, trained, wait_for, weights, write_recipe


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """The recipe trained by one machine of two processes: what two machines must reproduce."""
    return trained(tmp_path_factory.mktemp("pair"), 2)


def assert_bitwise_same_run(ours: Path, reference: Path) -> None:
    """Every step's loss and every tensor of every stage's final weights, equal to the last bit."""
    for stage in STAGES:
        assert losses(ours, stage) == losses(reference, stage), stage
        wa, wb = weights(ours, stage), weights(reference, stage)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), stage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def machines():
    """start(folder, port): the two machines' commands, as docs/distributed.md gives them; the first
    is up before the second starts, so it hosts the rendezvous. Whatever still runs at the end is
    killed (its workers die with it)."""
    started = []

    def start(folder: Path, port: int, launcher: str = "llmforge") -> list[subprocess.Popen]:
        meet = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}"]
        command = ["-m", "llmforge", "run", "recipe.yaml", *meet] if launcher == "llmforge" else \
            ["-m", "torch.distributed.run", *meet, "--rdzv-backend", "c10d", "--rdzv-id", "test",
             "-m", "llmforge", "run", "recipe.yaml"]

        def machine() -> subprocess.Popen:
            started.append(subprocess.Popen([sys.executable, *command], cwd=folder, text=True, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1")))
            return started[-1]

        first = machine()
        wait_for_listener(port, first)
        return [first, machine()]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for_listener(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on the rendezvous port {port}")


@pytest.mark.sampled(1)
@pytest.mark.parametrize("launcher", ["llmforge", "torchrun"])
def test_two_machines_train_like_one_machine_of_two_processes(pair, tmp_path, machines, launcher):
    folder = write_recipe(tmp_path)
    nodes = machines(folder, free_port(), launcher)
    results = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results
    assert sum(out.count("stage dpo: done") for out, _ in results) == 1  # one rank 0 between them
    assert json.loads((folder / RUN / "plan.json").read_text())["world_size"] == 2
    assert_bitwise_same_run(folder, pair)


@pytest.mark.sampled(1)
@pytest.mark.parametrize("lost", ["hosting the rendezvous", "the other"])
def test_a_lost_machine_ends_the_run_with_exit_2_and_the_same_commands_resume(pair, tmp_path, machines, lost):
    folder, port = write_recipe(tmp_path), free_port()
    nodes = machines(folder, port)
    wait_for(folder, nodes[0], "02-sft", 10)  # sft has checkpointed step 8
    victim, survivor = nodes if lost == "hosting the rendezvous" else nodes[::-1]
    victim.send_signal(signal.SIGKILL)  # the launcher: its worker dies with it, as on a machine that dies
    victim.communicate()
    _, err = survivor.communicate(timeout=60)  # the survivor notices, rather than waiting for its peer
    assert survivor.returncode == 2, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == \
        ["error: lost contact with another machine of this run: it stopped or cannot be reached"], err
    assert "run the same command again on every machine: it resumes from the last complete checkpoint" in err
    assert "Traceback" not in err
    rerun = machines(folder, port)
    results = [node.communicate(timeout=300) for node in rerun]
    assert [node.returncode for node in rerun] == [0, 0], results
    out = "".join(out for out, _ in results)
    assert "stage pretrain: already done" in out and "resuming from step-" in out, results
    assert_bitwise_same_run(folder, pair)


def test_several_machines_need_a_place_to_meet(tmp_path):
    result = cli("run", "recipe.yaml", "--nnodes", 2, cwd=write_recipe(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --nnodes 2 needs --rdzv-endpoint\nhint: the same host:port on every "
                                    "machine"), result.stderr
