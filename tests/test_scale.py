"""What lets 0.5-8B models train: rows trimmed to their longest (data/rows.py trim), activation
checkpointing (model/recompute.py checkpoint_blocks) and the plan's choice of it. Each gives
the results it replaces: the same losses and gradients within 1e-5 in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmforge.data.rows import IGNORE, trim
from llmforge.model.recompute import checkpoint_blocks
from llmforge.model.transformer import ModelConfig, Transformer
from llmforge.stages import dpo, kind, reward, sft

from .conftest import cli

TOL = dict(rtol=0, atol=1e-5)
CFG = dict(vocab_size=80, seq_len=200, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)


def model(cls=Transformer):
    torch.manual_seed(0)
    return cls(ModelConfig(**CFG))


def sft_rows(T=200, packed=True):
    g = np.random.default_rng(0)
    inputs, targets = np.zeros((2, T), dtype=np.int64), np.full((2, T), IGNORE, dtype=np.int64)
    docs = np.zeros((2, T), dtype=np.int64)
    for r, used in enumerate((70, 41)):  # both far from full: trimmed to 128
        inputs[r, :used] = g.integers(1, 80, used)
        targets[r, 10:used] = g.integers(1, 80, used - 10)
        docs[r, 30:used], docs[r, used:] = 1, 2
    return {"inputs": inputs, "targets": targets} | ({"docs": docs} if packed else {})


def pair_rows(T=200):
    g = np.random.default_rng(1)
    out = {}
    for side, n in (("chosen", (50, 90)), ("rejected", (60, 20))):
        tokens, learned = np.zeros((2, T + 1), dtype=np.int64), np.zeros((2, T), dtype=bool)
        for r, k in enumerate(n):
            tokens[r, :k] = g.integers(1, 80, k)
            learned[r, 8:k - 1] = True
        out[side], out[f"{side}_learned"] = tokens, learned
    return out | {"reference": np.zeros((2, 2), dtype=np.float32)}


def untrimmed(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()} | (
        {"docs": torch.from_numpy(batch["docs"])} if "docs" in batch else {})


def test_trim_cuts_every_row_array_to_the_longest_row_rounded_up():
    batch = pair_rows()
    cut = trim(batch)
    assert cut["chosen"].shape == (2, 129) and cut["chosen_learned"].shape == (2, 128)  # last learned 88: +2, to 128
    assert cut["reference"].shape == (2, 2)
    assert trim({"tokens": np.zeros((2, 201), dtype=np.int64)})["tokens"].shape == (2, 201)  # windows stay whole
    full = {k: np.ones_like(v) if k.endswith("learned") else v for k, v in batch.items()}
    assert trim(full) is full


@pytest.mark.parametrize("packed", [True, False])
def test_trimmed_sft_rows_give_the_same_losses_and_gradients(packed):
    m, batch = model(), sft_rows(packed=packed)
    got = sft.learned_losses(m, kind.to_device(batch, torch.device("cpu")))
    assert kind.to_device(batch, torch.device("cpu"))["inputs"].shape == (2, 128)
    want = sft.learned_losses(m, untrimmed(batch))
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(torch.autograd.grad(got.sum(), list(m.parameters())),
                    torch.autograd.grad(want.sum(), list(m.parameters()))):
        torch.testing.assert_close(a, b, **TOL)


def test_trimmed_pair_rows_give_the_same_log_probs_and_rewards():
    batch, cpu = pair_rows(), torch.device("cpu")
    m = model()
    for a, b in zip(dpo.pair_logps(m, kind.to_device(batch, cpu)), dpo.pair_logps(m, untrimmed(batch))):
        torch.testing.assert_close(a, b, **TOL)
    rm = model(reward.RewardModel)  # reads the reward at the reply's last token, which trimming must keep
    for a, b in zip(reward.pair_rewards(rm, kind.to_device(batch, cpu)), reward.pair_rewards(rm, untrimmed(batch))):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(mode):
    ref, m = model(), model()
    checkpoint_blocks(m, mode)
    assert [b.checkpointed for b in m.blocks] == ([True, False, True] if mode == "selective" else [True] * 3)
    batch = untrimmed(sft_rows())
    got, want = sft.learned_losses(m, batch).sum(), sft.learned_losses(ref, batch).sum()
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    for (name, a), b in zip(m.named_parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_a_recomputed_block_keeps_its_down_projection_instead_of_multiplying_again():
    """Backward recomputes a checkpointed block to rebuild what its own backward reads; the
    output of the MLP's down projection is not among it, so the recompute takes the one kept
    from the forward (model/recompute.py) and runs no [tokens, hidden] x [hidden, n_embd] matmul."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m = model()
    checkpoint_blocks(m, "full")
    # w2's forward multiplies by its weight transposed, [hidden, n_embd] (w1's and w3's input
    # gradients by a weight of that shape; w2's own by its weight, [n_embd, hidden])
    down = {(b.mlp.w2.weight.data_ptr(), tuple(b.mlp.w2.weight.t().shape)) for b in m.blocks}

    class DownMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            matmul = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            if matmul and (args[-1].data_ptr(), tuple(args[-1].shape)) in down:
                DownMatmuls.count += 1
            return op(*args, **(kwargs or {}))

    loss = sft.learned_losses(m, untrimmed(sft_rows())).sum()
    with DownMatmuls():
        loss.backward()
    assert DownMatmuls.count == 0
    with DownMatmuls():  # the count would see them: the forward runs one per block
        sft.learned_losses(m, untrimmed(sft_rows())).sum()
    assert DownMatmuls.count == CFG["n_layer"]


RECIPE = """\
name: big
tokenizer: {{type: bpe, vocab_size: 320}}
model: {{preset: llama, n_layer: 32, n_head: 16, n_kv_head: 4, n_embd: 1280, seq_len: 4096}}
data:
  corpus: {{path: corpus.txt}}
stages:
  - {{name: pretrain, kind: pretrain, mix: {{corpus: 1.0}}, steps: 10, batch_size: 4}}
runtime: {{activation_checkpointing: {ac}}}
"""


def test_the_plan_turns_checkpointing_on_when_the_micro_batch_does_not_fit_without(tmp_path):
    (tmp_path / "corpus.txt").write_text("ka lo mi ne ta " * 20000)
    chose = {}
    for ac in ("none", "auto", "full"):
        (tmp_path / "recipe.yaml").write_text(RECIPE.format(ac=ac))
        result = cli("plan", "recipe.yaml", "--target", "4090", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        line = result.stdout.split("= micro ")[1].split("\n")[0]
        chose[ac] = (int(line.split()[0]), line.split("activation checkpointing ")[1].split(":")[0] if ac != "none" else "")
    # A 557M model at 4096 tokens a row on 24 GB: micro-batch 2 as it is; the 4 wanted (16k tokens)
    # with every other block checkpointed, which auto prefers to all of them (less recompute).
    assert chose == {"none": (2, ""), "auto": (4, "selective"), "full": (4, "full")}
    assert "activation checkpointing full: 32 of 32 blocks recompute their forward in backward, ~28% more " \
           "compute" in result.stdout


def test_cuda_rng_states_saved_on_more_devices_restore_onto_fewer(monkeypatch):
    """A checkpoint written where 4 GPUs were visible resumes where 2 are: the first two states
    go to the two devices, none to a device that is not there."""
    from llmforge.store import checkpoint

    cpu = checkpoint.rng_state()["torch"]  # any state bytes: only where they go is checked
    saved = {"torch": cpu, "cuda": [cpu] * 4}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((device, len(s))))
    checkpoint.set_rng_state(saved)
    assert [d for d, _ in restored] == [0, 1]


def test_compile_is_per_block_and_evals_and_generation_run_eager():
    """runtime.compile compiles each block in place (the module trained is the model itself, so
    checkpoints and FSDP see the same names); evals and generation never compile a graph."""
    from llmforge.model.generate import generate_batch
    from llmforge.run import distributed
    from llmforge.run.distributed import Dist
    from llmforge.run.step import evaluate

    torch._dynamo.reset()
    m = model()
    assert distributed.wrap(m, "single", Dist(), torch.device("cpu"), bf16=False, compile=True) is m
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in m.blocks)
    objective = sft.Objective(None, np.ones(80, dtype=np.int64))
    before = dict(torch._dynamo.utils.counters["stats"])
    evaluate(m, objective, {"chat": sft_rows()}, 2, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    generate_batch(m, torch.ones(2, 4, dtype=torch.long), torch.tensor([4, 2]), 3, temperature=0.0, top_k=None,
                   generator=None, stop_ids=(), vocab_limit=80)
    assert dict(torch._dynamo.utils.counters["stats"]) == before  # nothing was traced or compiled


def test_qlora_computes_in_its_weights_dtype_whatever_the_input(monkeypatch):
    """bitsandbytes' 4-bit matmul is not autocast-aware, and its fused kernel refuses a bias of
    another dtype than the input (\"bias dtype must match A dtype\"): a QLoRA layer hands it
    input and bias in the dtype the weight was quantized from. A stand-in for bitsandbytes (it
    needs CUDA) checks what it is given, as the real kernel does."""
    import sys
    import types

    from llmforge.model.adapters import LoRALinear

    seen = []

    def matmul_4bit(A, B, bias=None, quant_state=None):
        if bias is not None and bias.dtype != A.dtype:
            raise RuntimeError(f"bias dtype ({bias.dtype}) must match A dtype ({A.dtype})")
        seen.append(A.dtype)
        return torch.nn.functional.linear(A, B.t().to(A.dtype), bias)

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(matmul_4bit=matmul_4bit))
    layer = torch.nn.Linear(16, 8, bias=True)
    layer.__class__ = LoRALinear
    layer.lora_A, layer.lora_B = torch.nn.Parameter(torch.randn(4, 16)), torch.nn.Parameter(torch.zeros(8, 4))
    layer.scale, layer.lora_dropout = 1.0, 0.0
    layer.register_buffer("weight_4bit", layer.weight.data.to(torch.bfloat16))  # stands for the NF4 bytes
    layer.quant_state = types.SimpleNamespace(dtype=torch.bfloat16)
    out = layer(torch.randn(3, 16))  # fp32 in, as a norm's output reaches q_proj
    assert seen == [torch.bfloat16] and out.shape == (3, 8)


SMOLLM2_360M = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                    num_key_value_heads=5)


def test_init_finetune_on_a_360m_model_folder_plans_and_trains_on_this_machine(tmp_path):
    """`llmforge init --template finetune --model` on a random model of SmolLM2-360M's shape (its
    context 8,192 tokens): the recipe plans as written on a 24 GiB machine, each stage's seq_len
    derived from its data (not the context), and its sft stage trains (one short step here)."""
    from .hf_families import build_folder

    build_folder(tmp_path / "smol360", "llama", max_len=8192, shape=SMOLLM2_360M)
    assert cli("init", "mine", "--template", "finetune", "--model", "smol360", cwd=tmp_path).returncode == 0
    plan = cli("plan", "mine.yaml", "--target", "4090", cwd=tmp_path)  # 24 GB, whatever this machine is
    assert plan.returncode == 0, plan.stderr
    assert "seq_len 256: from its data: the longest example is 236 tokens (the model's context: 8,192)" in plan.stdout
    assert "seq_len 192: from its data: the longest example is 159 tokens" in plan.stdout
    recipe = (tmp_path / "mine.yaml").read_text()
    sft = recipe[:recipe.index("  - name: dpo")].replace("epochs: 2", "steps: 1", 1)  # the sft stage, one step
    (tmp_path / "sft.yaml").write_text(sft)
    run = cli("run", "sft.yaml", "--set", "stages[0].batch_size=2", "--set", "stages[0].eval.tokens=256",
              cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "runs/mine/stages/01-sft/final/model.safetensors").is_file()


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_keeping_two_tensors_gives_the_same_values_and_gradients(bias):
    """model/swiglu.py: backward recomputes silu(a) and the product instead of keeping them."""
    import torch.nn.functional as F

    from llmforge.model.swiglu import swiglu_down

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 7, 24, generator=g, requires_grad=True) for _ in range(2))
    w = torch.randn(10, 24, generator=g, requires_grad=True)
    bb = torch.randn(10, generator=g, requires_grad=True) if bias else None
    up = torch.randn(3, 7, 10, generator=g)
    ours = swiglu_down(a, b, w, bb)
    plain = F.linear(F.silu(a) * b, w, bb)
    torch.testing.assert_close(ours, plain, **TOL)
    inputs = [a, b, w] + ([bb] if bias else [])
    for x, y in zip(torch.autograd.grad((ours * up).sum(), inputs), torch.autograd.grad((plain * up).sum(), inputs)):
        torch.testing.assert_close(x, y, **TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as autocast's linear: bf16 math, fp32 weight gradient
        a16, b16 = a.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_()
        out = swiglu_down(a16, b16, w, bb)
        ref = F.linear(F.silu(a16) * b16, w, bb)
    assert out.dtype == ref.dtype == torch.bfloat16
    gw, gref = torch.autograd.grad(out.float().sum(), w)[0], torch.autograd.grad(ref.float().sum(), w)[0]
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gw, gref, rtol=2e-2, atol=2e-2)
    # and in the model: a block saves two hidden-wide tensors for its MLP, not four
    m = model()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        m.blocks[0].mlp(torch.randn(2, 5, 32))
    assert sum(s == (2, 5, m.config.hidden) for s in saved) == 2  # unfused: four
