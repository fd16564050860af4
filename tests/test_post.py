"""Post-training: the chat template and its loss mask, packing isolation, the DPO loss, stage
chaining, exact resume in sft and dpo stages, and the chat/sample/eval commands."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmforge.data.rows import IGNORE, Examples, PackedRows, PairRows, pack_best_fit
from llmforge.model.families import PRESETS
from llmforge.model.transformer import ModelConfig, Transformer
from llmforge.stages import dpo, sft
from llmforge.text.chat import ChatTemplate
from llmforge.text.templates import template_from_spec as load_template

from .conftest import cli, make_corpus

# --- a small world of people and places, for chat and preference data ------------------------------

PEOPLE = ["Kalo", "Mine", "Tari", "Suvo", "Elan", "Oris", "Rika", "Nelo", "Vomi", "Lota"]
PLACES = ["Kamisu", "Lorita", "Nevo", "Suran", "Talo"]


def place(i: int) -> str:
    return PLACES[(3 * i + 1) % len(PLACES)]


def conversations(n: int = 60) -> list[dict]:
    out = []
    for i in range(n):
        who = PEOPLE[i % len(PEOPLE)]
        messages = [{"role": "user", "content": f"Where is {who}?"},
                    {"role": "assistant", "content": f"{who} is in {place(i % len(PEOPLE))}."}]
        if i % 4 == 0:
            messages = [{"role": "system", "content": "Answer briefly."}] + messages
        if i % 3 == 0:
            other = PEOPLE[(i + 3) % len(PEOPLE)]
            messages += [{"role": "user", "content": f"And {other}?"},
                         {"role": "assistant", "content": f"{other} is in {place((i + 3) % len(PEOPLE))}."}]
        out.append({"messages": messages})
    return out


def preferences(n: int = 60) -> list[dict]:
    out = []
    for i in range(n):
        who = PEOPLE[i % len(PEOPLE)]
        chosen = f"{who} is in {place(i % len(PEOPLE))}."
        rejected = chosen + " I hope this helps!" if i % 2 else f"{who} is in {place(i % len(PEOPLE) + 1)}."
        out.append({"prompt": f"Where is {who}?", "chosen": chosen, "rejected": rejected})
    return out


def questions(n: int = 60) -> list[dict]:
    return [{"prompt": f"Where is {PEOPLE[i % len(PEOPLE)]}?",
             "answer": f"{PEOPLE[i % len(PEOPLE)]} is in {place(i % len(PEOPLE))}."} for i in range(n)]


RECIPE = """\
name: post
seed: 11
tokenizer: {type: bpe, vocab_size: 320, chat_template: default}
model: {preset: llama, n_layer: 2, n_head: 2, n_kv_head: 1, n_embd: 32, seq_len: 64}
data:
  corpus: {path: corpus.txt, val_fraction: 10%}
  chat: {path: chat.jsonl, format: chat, val_fraction: 10%}
  prefs: {path: prefs.jsonl, format: preference, val_fraction: 10%}
  questions: {path: questions.jsonl, format: prompt, val_fraction: 10%}
stages:
  - name: pretrain
    kind: pretrain
    mix: {corpus: 1.0}
    steps: 16
    batch_tokens: 256
    optimizer: {lr: 3e-3}
    eval: {every: 8, tokens: 1024}
  - name: sft
    kind: sft
    mix: {chat: 1.0}
    steps: 24
    batch_size: 4
    optimizer: {lr: 2e-3, weight_decay: 0.0}
    eval: {every: 8, tokens: 1024}
    checkpoint: {every: 4, keep: 2}
  - name: dpo
    kind: dpo
    init: pretrain
    mix: {prefs: 1.0}
    steps: 16
    batch_size: 4
    beta: 0.1
    optimizer: {lr: 1e-3, weight_decay: 0.0}
    eval: {every: 8, tokens: 1024}
    checkpoint: {every: 4, keep: 2}
  - name: rm
    kind: reward
    init: sft
    mix: {prefs: 1.0}
    steps: 12
    batch_size: 4
    optimizer: {lr: 1e-3, weight_decay: 0.0}
    eval: {every: 6, tokens: 1024}
    checkpoint: {every: 4, keep: 2}
  - name: grpo
    kind: grpo
    init: sft
    mix: {questions: 1.0}
    steps: 8
    batch_size: 4
    group: 4
    max_new_tokens: 12
    reward: [{verifier: exact}, {verifier: format, weight: 0.5}, {stage: rm, weight: 0.5}]
    optimizer: {lr: 1e-3, weight_decay: 0.0}
    eval: {every: 4, tokens: 2048}
    checkpoint: {every: 2, keep: 2}
runtime: {log_every: 2, threads: 1}  # 1: far faster on a busy 2-core machine
"""


def write_data(folder: Path) -> None:
    (folder / "corpus.txt").write_text(make_corpus(6000, seed=3))
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    (folder / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preferences()))
    (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in questions()))


RUN = Path("runs/post")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """pretrain -> sft (starts from pretrain) -> dpo (init: pretrain) -> rm (a reward model, init:
    sft) -> grpo (init: sft, rewarded by verifiers and rm), run once for the module."""
    folder = tmp_path_factory.mktemp("post")
    write_data(folder)
    (folder / "recipe.yaml").write_text(RECIPE)
    result = cli("run", "recipe.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return folder


def final_weights(run: Path, stage: str) -> bytes:
    return (run / "stages" / stage / "final" / "model.safetensors").read_bytes()


# --- chat template -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from llmforge.text.tokenizer import Tokenizer, train_tokenizer

    docs = [make_corpus(3000, seed=5)] + [" ".join(m["content"] for m in c["messages"]) for c in conversations()]
    path = train_tokenizer(docs, tmp_path_factory.mktemp("tok"), type="bpe", vocab_size=300,
                           user_symbols=ChatTemplate().symbols)
    return Tokenizer.load(path)


def test_template_renders_and_masks(tok):
    t = ChatTemplate()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, learned = t.render(tok, messages)
    assert tok.decode(ids) == "<|user|>Hi<|end|><|assistant|>Hello<|end|>"
    user, assistant, end = (tok.special_id(s) for s in (t.user, t.assistant, t.end))
    hi, hello = tok.encode("Hi"), tok.encode("Hello")
    assert ids == [user, *hi, end, assistant, *hello, end]
    # Learned: exactly the assistant's content and the <|end|> that closes its turn.
    assert learned == [False] * (len(hi) + 3) + [True] * (len(hello) + 1)
    # Two assistant turns and a system message: each assistant turn's content + end, nothing else.
    long = [{"role": "system", "content": "Be brief."}] + messages + \
        [{"role": "user", "content": "Where is Kalo?"}, {"role": "assistant", "content": "In Nevo."}]
    ids, learned = t.render(tok, long)
    spans = [(text, learn) for text, special, learn in t.segments(long)]
    assert [text for text, learn in spans if learn] == ["Hello", "<|end|>", "In Nevo.", "<|end|>"]
    picked = tok.decode([i for i, flag in zip(ids, learned) if flag])
    assert picked == "Hello<|end|>In Nevo.<|end|>"
    # train_on all: everything but the first token.
    ids_all, learned_all = t.render(tok, long, train_on="all")
    assert ids_all == ids and learned_all == [False] + [True] * (len(ids) - 1)
    # The generation prompt: the conversation so far, then the assistant's tag.
    prompt = t.prompt(tok, [{"role": "user", "content": "Hi"}])
    assert prompt == [user, *hi, end, assistant] and prompt[-1] == tok.special_id("<|assistant|>")
    assert t.stop_ids(tok) == (end, tok.eot_id)
    # The tags count as no text in bits per byte.
    assert tok.token_bytes[[user, assistant, end]].tolist() == [0, 0, 0]


# --- loss mask, end to end through rows and the sft objective ---------------------------------------

def examples(seqs: list[tuple[list[int], list[bool]]], per_example: int = 1) -> Examples:
    lengths = [len(ids) for ids, _ in seqs]
    return Examples(tokens=np.array([i for ids, _ in seqs for i in ids], dtype=np.uint16),
                    learned=np.array([f for _, fl in seqs for f in fl], dtype=np.uint8),
                    offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                    per_example=per_example, origins=lambda i: f"x:{i}")


def chat_sequences(tok, n: int = 7):
    t = ChatTemplate()
    return [t.render(tok, c["messages"]) for c in conversations(n)]


@pytest.mark.parametrize("packing", [True, False])
def test_loss_mask_end_to_end(tok, packing):
    seqs = chat_sequences(tok)
    ex = examples(seqs)
    rows = PackedRows(ex, 128, packing=packing, overlong="truncate", train_on="assistant", seed=0)
    assert rows.layout.truncated == rows.layout.dropped == 0 and len(rows.layout.keep) == len(seqs)
    assert rows.n_rows < len(seqs) if packing else rows.n_rows == len(seqs)
    batch = rows.rows(np.arange(rows.n_rows))
    assert set(batch) == ({"inputs", "targets", "docs"} if packing else {"inputs", "targets"})
    expected_units = 0
    for r in range(rows.n_rows):
        fill = 0
        order = rows.layout.keep[rows.layout.row_starts[r]:rows.layout.row_starts[r + 1]]
        for d, e in enumerate(order.tolist()):
            ids, learned = map(np.asarray, seqs[e])
            n = len(ids) - 1
            assert batch["inputs"][r, fill:fill + n].tolist() == ids[:-1].tolist()
            want = np.where(learned[1:], ids[1:], IGNORE)
            assert batch["targets"][r, fill:fill + n].tolist() == want.tolist()
            if packing:
                assert (batch["docs"][r, fill:fill + n] == d).all()
            expected_units += int(learned[1:].sum())
            fill += n
        assert (batch["targets"][r, fill:] == IGNORE).all()  # padding learns nothing
    assert expected_units == sum(int(np.sum(l[1:])) for _, l in seqs)
    objective = sft.Objective(None, tok.token_bytes)
    assert objective.units(batch) == expected_units == int((batch["targets"] != IGNORE).sum())
    # The loss is summed over exactly those targets: changing an ignored target changes nothing.
    cfg = ModelConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        loss = objective.loss(model, tensors)["loss"]
        per_target = sft.target_losses(model, tensors)
    assert (per_target[tensors["targets"] == IGNORE] == 0).all()
    assert (per_target[tensors["targets"] != IGNORE] > 0).all()
    assert torch.allclose(loss, per_target.sum())


def test_train_on_all_learns_every_target(tok):
    seqs = chat_sequences(tok, 3)
    rows = PackedRows(examples(seqs), 128, packing=True, overlong="truncate", train_on="all", seed=0)
    batch = rows.rows(np.arange(rows.n_rows))
    assert sft.Objective(None, tok.token_bytes).units(batch) == sum(len(ids) - 1 for ids, _ in seqs)


def test_best_fit_packing_places_every_conversation_once_and_pads_less():
    rng = np.random.default_rng(0)
    sizes = rng.integers(40, 81, 500).tolist()
    rows = pack_best_fit(sizes, 256)
    assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in row) <= 256 for row in rows)
    next_fit, fill = 1, 0  # a new row at each misfit, as before best fit
    for size in sizes:
        next_fit, fill = (next_fit + 1, size) if fill + size > 256 else (next_fit, fill + size)
    assert len(rows) <= 0.95 * next_fit
    assert pack_best_fit([256, 1, 255], 256) == [[0], [1, 2]]


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_logit_share_is_the_fullest_rows_share_of_learned_targets(tok, train_on):
    seqs = chat_sequences(tok, 9)
    for seq_len, packing in ((128, True), (128, False), (24, True)):  # 24: conversations cut
        rows = PackedRows(examples(seqs), seq_len, packing=packing, overlong="truncate", train_on=train_on, seed=0)
        batch = rows.rows(np.arange(rows.n_rows))
        assert rows.logit_share() == (batch["targets"] != IGNORE).sum(axis=1).max() / seq_len
    pairs = examples(seqs[:8], per_example=2)
    rows = PairRows(pairs, 24, overlong="truncate", seed=0)
    batch = rows.rows(np.arange(rows.n_rows), with_reference=False)
    learned = batch["chosen_learned"].sum(axis=1) + batch["rejected_learned"].sum(axis=1)
    assert rows.logit_share() == learned.max() / 48


# --- packing isolation --------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_packed_documents_do_not_see_each_other(preset):
    cfg = ModelConfig(**{**PRESETS[preset], "vocab_size": 50, "seq_len": 32, "n_layer": 2, "n_head": 2,
                         "n_embd": 32})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 50, (11,), generator=g), torch.randint(0, 50, (14,), generator=g)
    seqs = [(a.tolist(), [True] * 11), (b.tolist(), [True] * 14)]
    rows = PackedRows(examples(seqs), 32, packing=True, overlong="truncate", train_on="all", seed=0)
    assert rows.n_rows == 1
    batch = {k: torch.from_numpy(v) for k, v in rows.rows(np.array([0])).items()}
    docs = batch["docs"][0]
    order = rows.layout.keep.tolist()
    second = torch.from_numpy(np.asarray(seqs[order[1]][0]))
    first_len = len(seqs[order[0]][0]) - 1
    span = slice(first_len, first_len + len(second) - 1)
    assert (docs[span] == 1).all() and (docs[:first_len] == 0).all() and (docs[span.stop:] == 2).all()
    with torch.no_grad():
        packed = model(batch["inputs"], docs=batch["docs"])
        changed_inputs = batch["inputs"].clone()
        changed_inputs[0, :first_len] = (changed_inputs[0, :first_len] + 7) % 50
        changed = model(changed_inputs, docs=batch["docs"])
        alone = model(second[None, :-1])
    assert not torch.allclose(packed[0, :first_len], changed[0, :first_len])  # the edit mattered there
    assert torch.allclose(packed[0, span], changed[0, span], atol=1e-6, rtol=0)
    assert torch.allclose(packed[0, span], alone[0], atol=1e-6, rtol=0)


# --- DPO ----------------------------------------------------------------------------------------------

def _logsigmoid(x: float) -> float:
    return math.log(1 / (1 + math.exp(-x)))


@pytest.mark.parametrize("loss,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_terms_by_hand(loss, smoothing):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    out = dpo.dpo_terms(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, label_smoothing=smoothing, loss=loss)
    h = (-1.0 + 1.5) - (-2.0 + 1.5)  # = 1.0
    if loss == "ipo":
        expected = (h - 1 / (2 * 0.1)) ** 2  # = 16
    else:
        expected = -(1 - smoothing) * _logsigmoid(0.1 * h) - smoothing * _logsigmoid(-0.1 * h)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert out["reward_chosen"].item() == pytest.approx(0.05) and out["reward_rejected"].item() == pytest.approx(-0.05)
    assert dpo.dpo_terms(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)["loss"].item() == \
        pytest.approx(math.log(1 + math.exp(-0.1)), rel=1e-12)


def pair_batch(tok):
    """One preference pair as PairRows builds it, with the reference filled in later."""
    t = ChatTemplate()
    head = [{"role": "user", "content": "Where is Kalo?"}]
    chosen = t.encode(tok, t.pair_segments(head, "Kalo is in Nevo."))
    rejected = t.encode(tok, t.pair_segments(head, "Kalo is in Nevo. I hope this helps!"))
    rows = PairRows(examples([chosen, rejected], per_example=2), 64, overlong="truncate", seed=0)
    batch = rows.rows(np.arange(1), with_reference=False)
    n_chosen = sum(chosen[1][1:])
    assert batch["chosen_learned"].sum() == n_chosen and batch["rejected_learned"].sum() == sum(rejected[1][1:])
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def test_dpo_step_raises_the_margin(tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, seq_len=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    batch = pair_batch(tok)
    objective = dpo.Objective(SimpleNamespace(options=dpo.Options(beta=0.1)), tok.token_bytes)
    batch["reference"] = torch.from_numpy(objective.reference(model, batch))  # the starting weights
    with torch.no_grad():
        c0, r0 = dpo.pair_logps(model, batch)
    assert torch.allclose(batch["reference"], torch.stack([c0, r0], dim=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sums = objective.loss(model, batch)
    assert sums["loss"].item() == pytest.approx(math.log(2), rel=1e-5)  # h = 0 at the reference
    (sums["loss"] / objective.units(batch)).backward()
    optimizer.step()
    with torch.no_grad():
        c1, r1 = dpo.pair_logps(model, batch)
        after = objective.loss(model, batch)
    assert (c1 - r1).item() > (c0 - r0).item()
    assert after["loss"].item() < math.log(2) and after["reward_acc"].item() == 1.0


# --- stage chaining -------------------------------------------------------------------------------------

def stage_model(run: Path, stage: str) -> Transformer:
    from llmforge.store.final import load_trained

    return load_trained(run / "stages" / stage / "final")[0]


def stage_sources(folder: Path, run: Path, stage: str):
    """The recipe's stage plan (from plan.json) and its prepared sources, as the engine saw them."""
    from llmforge.data.cache import prepare_source
    from llmforge.run.evaluation import load_run_recipe
    from llmforge.text.tokenizer import Tokenizer

    recipe = load_run_recipe(run)
    tokenizer = Tokenizer.load(run / "tokenizer/tokenizer.model")
    template = load_template(recipe.tokenizer.chat_template)
    plan = json.loads((run / "plan.json").read_text())
    sp = next(s for s in plan["stages"] if s["name"] == stage)
    from llmforge.stages import KINDS

    sp = SimpleNamespace(**{**sp, "mix": [SimpleNamespace(**m) for m in sp["mix"]],
                            "options": KINDS[sp["kind"]].Options(**sp["options"])})
    sources = {m.name: prepare_source(m.name, recipe.data[m.name], folder, tokenizer, template=template)
               for m in sp.mix}
    return sp, sources, tokenizer, recipe


def test_stages_chain_from_their_init(trained):
    from llmforge.run.engine import eval_batches, evaluate, stage_rows

    run = trained / RUN
    plan = json.loads((run / "plan.json").read_text())
    assert [(s["name"], s["init"]) for s in plan["stages"]] == [("pretrain", None), ("sft", "pretrain"),
                                                                 ("dpo", "pretrain"), ("rm", "sft"), ("grpo", "sft")]
    pretrain, tuned = stage_model(run, "01-pretrain"), stage_model(run, "02-sft")
    # sft starts from pretrain's final weights: its step-0 eval is what those weights score.
    sp, sources, tokenizer, recipe = stage_sources(trained, run, "sft")
    _, evals = stage_rows(sources, sp, recipe.seed)
    objective = sft.Objective(sp, tokenizer.token_bytes)
    batches = eval_batches(evals)
    scored = evaluate(pretrain, objective, batches, sp.micro_batch, torch.device("cpu"), _nullcontext())
    first = json.loads((run / "stages/02-sft/metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(scored["val_loss"], rel=1e-6)
    # dpo has init: pretrain, so its frozen reference is pretrain's final weights, not sft's.
    sp, sources, _, recipe = stage_sources(trained, run, "dpo")
    train, _ = stage_rows(sources, sp, recipe.seed)
    rows = train["prefs"]
    batch = {k: torch.from_numpy(v) for k, v in rows.rows(np.arange(rows.n_rows), with_reference=False).items()}
    with np.load(run / "stages/03-dpo/reference.npz") as saved:
        stored = saved["train/prefs"]
        assert set(saved.files) == {"identity", "train/prefs", "val/prefs"}
    ours = dpo.Objective(sp, None).reference(pretrain, batch)
    assert stored.shape == ours.shape == (rows.n_rows, 2)
    np.testing.assert_allclose(stored, ours, rtol=1e-5, atol=1e-5)
    from_sft = dpo.Objective(sp, None).reference(tuned, batch)
    assert not np.allclose(stored, from_sft, atol=1e-3)
    # The dpo stage moved away from its start; sft did too.
    assert final_weights(run, "03-dpo") != final_weights(run, "01-pretrain")
    assert final_weights(run, "02-sft") != final_weights(run, "01-pretrain")


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


# --- kill -9 and resume inside sft and dpo stages --------------------------------------------------------

def start(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmforge", "run", "recipe.yaml", *args], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def kill_at(folder: Path, proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 120) -> None:
    """SIGKILL `proc` once its stage has logged `step` (training metrics only)."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and any(json.loads(l).get("step", 0) >= step and "loss" in json.loads(l)
                                        for l in metrics.read_text().splitlines() if l.endswith("}")):
                return
            time.sleep(0.01)
        raise AssertionError(f"the run never reached step {step} in {metrics} ({proc.poll()})")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()


def test_kill_9_in_every_post_training_stage_resumes_bitwise(trained):
    """The same recipe in a second run directory from pretrain's final weights: killed in sft,
    resumed, killed in dpo, resumed, killed in rm, resumed, killed in grpo (mid-rollouts: its
    replies are sampled anew after the resume), resumed; every final model equals the
    uninterrupted run's."""
    run = trained / RUN
    copy = trained / "runs/killed"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("02-sft", "03-dpo", "04-rm", "05-grpo", ".lock"))
    args = ("--run-dir", "runs/killed")
    kill_at(trained, start(trained, *args), copy / "stages/02-sft/metrics.jsonl", 6)
    assert not (copy / "stages/02-sft/final").exists()
    assert list((copy / "stages/02-sft/checkpoints").glob("step-*"))  # something to resume from
    proc = start(trained, *args)
    kill_at(trained, proc, copy / "stages/03-dpo/metrics.jsonl", 6)
    assert (copy / "stages/02-sft/final").exists() and not (copy / "stages/03-dpo/final").exists()
    kill_at(trained, start(trained, *args), copy / "stages/04-rm/metrics.jsonl", 6)
    assert (copy / "stages/03-dpo/final").exists() and not (copy / "stages/04-rm/final").exists()
    kill_at(trained, start(trained, *args), copy / "stages/05-grpo/metrics.jsonl", 4)
    assert (copy / "stages/04-rm/final").exists() and not (copy / "stages/05-grpo/final").exists()
    result = cli("run", "recipe.yaml", *args, cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "stage rm: already done" in result.stdout and "stage grpo: resuming from step-" in result.stdout
    for stage in ("01-pretrain", "02-sft", "03-dpo", "04-rm", "05-grpo"):
        assert final_weights(copy, stage) == final_weights(run, stage), stage
    # The resumed metrics read like the uninterrupted run's: every step once, the same numbers.
    for stage in ("02-sft", "03-dpo", "04-rm", "05-grpo"):
        def curve(r):
            return [(m["step"], m.get("loss"), m.get("val_loss"), m.get("reward"), m.get("val_reward")) for m in
                    map(json.loads, (r / "stages" / stage / "metrics.jsonl").read_text().splitlines())]
        assert curve(copy) == curve(run), stage


def test_activation_checkpointing_and_trimmed_rows_train_the_same_weights(trained):
    """Every post-training kind again with each block checkpointed (recomputed in backward): the
    same final weights, bit for bit, as the run without. Rows are trimmed to their longest in
    both (data/rows.py trim); test_scale.py checks trimming against untrimmed rows."""
    run, copy = trained / RUN, trained / "runs/checkpointed"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("02-sft", "03-dpo", "04-rm", "05-grpo", ".lock"))
    result = cli("run", "recipe.yaml", "--run-dir", "runs/checkpointed", "--set",
                 "runtime.activation_checkpointing=full", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "activation checkpointing full: 2 of 2 blocks recompute" in result.stdout
    for stage in ("02-sft", "03-dpo", "04-rm", "05-grpo"):
        assert final_weights(copy, stage) == final_weights(run, stage), stage


def test_grpo_is_refused_under_fsdp_and_auto_keeps_it_on_ddp(trained):
    """grpo decodes until each rank's own replies end: under FSDP2 the ranks' per-token weight
    all-gathers would stop pairing up, so the plan refuses the combination, naming both keys."""
    fsdp = cli("plan", "recipe.yaml", "--nproc-per-node", "2", "--set", "runtime.parallel=fsdp", cwd=trained)
    assert fsdp.returncode == 2 and "Traceback" not in fsdp.stderr
    assert "stages[4].kind: grpo's rollout runs a forward per generated token" in fsdp.stderr
    assert "runtime.parallel: fsdp" in fsdp.stderr
    auto = cli("plan", "recipe.yaml", "--nproc-per-node", "2", cwd=trained)
    assert auto.returncode == 0, auto.stderr
    assert "parallel: ddp over 2 processes" in auto.stdout


# --- chat, sample --chat, eval ------------------------------------------------------------------------

GREEDY = ("--temperature", "0", "--max-new-tokens", "12")


def test_sample_generates_on_the_device_and_precision_a_run_would_train_with(trained, monkeypatch):
    """`sample` (and `chat`) take the device a run would: here a CPU said to compute in bf16 (as a
    GPU would), so every forward runs under bf16 autocast."""
    from llmforge.model.transformer import Transformer
    from llmforge.plan.devices import Device
    from llmforge.run import evaluation

    from .conftest import in_process

    monkeypatch.setattr(evaluation, "detect_device", lambda runtime: Device("cpu", "cpu", 2**34, "bf16", False, 1, None))
    seen, forward = [], Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: seen.append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")) or forward(self, *a, **k))
    result = in_process("sample", trained / RUN, "--chat", "--prompt", "Where is Kalo?", "--stage", "sft", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert seen and set(seen) == {torch.bfloat16}


def test_chat_through_stdin(trained):
    result = subprocess.run([sys.executable, "-m", "llmforge", "chat", str(RUN), "--stage", "sft", *GREEDY],
                            cwd=trained, input="Where is Kalo?\n/reset\nhello\n/quit\nnever read\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("(new conversation)") == 1
    # Two replies, each exactly what `sample --chat` says to that message alone (greedy).
    replies = []
    for prompt in ("Where is Kalo?", "hello"):
        one = cli("sample", RUN, "--chat", "--prompt", prompt, "--stage", "sft", *GREEDY, cwd=trained)
        assert one.returncode == 0, one.stderr
        assert one.stdout.endswith("\n")
        replies.append(one.stdout)
    assert result.stdout == "".join(replies)


def test_eval_json(trained):
    run = trained / RUN
    result = cli("eval", RUN, "--stage", "sft", "--json", cwd=trained)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    saved = json.loads((run / "stages/02-sft/final/eval.json").read_text())
    assert scores["stage"] == "sft" and scores["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-6)
    assert 0 < scores["val_loss"] < 10 and "val_bpb" in scores
    result = cli("eval", RUN, "--stage", "dpo", "--json", cwd=trained)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    saved = json.loads((run / "stages/03-dpo/final/eval.json").read_text())
    assert scores["stage"] == "dpo" and 0 <= scores["val_reward_acc"] <= 1
    assert scores["val_reward_acc"] == pytest.approx(saved["val_reward_acc"])
    assert scores["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-6)
    # The reward model: its held-out pair accuracy and margin, as the run measured them.
    result = cli("eval", RUN, "--stage", "rm", "--json", cwd=trained)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    saved = json.loads((run / "stages/04-rm/final/eval.json").read_text())
    assert scores["val_accuracy"] == pytest.approx(saved["val_accuracy"]) and 0 <= scores["val_accuracy"] <= 1
    assert scores["val_margin"] == pytest.approx(saved["val_margin"], rel=1e-5, abs=1e-6)


def test_a_reward_model_learns_the_preferences_and_cannot_chat(trained):
    metrics = [json.loads(line) for line in (trained / RUN / "stages/04-rm/metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_accuracy" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # Bradley-Terry loss on held-out pairs
    assert all("accuracy" in m and "margin" in m for m in metrics if "loss" in m and "val_loss" not in m)
    for command in (("chat",), ("sample", "--prompt", "hi"), ("export", "--out", "exported")):
        result = cli(*command[:1], RUN, "--stage", "rm", *command[1:], cwd=trained)
        assert result.returncode == 2 and "scores replies and cannot write them" in result.stderr, command
        assert "Traceback" not in result.stderr


def test_grpo_logs_its_rollouts_and_eval_rescores_them(trained):
    metrics = [json.loads(line) for line in (trained / RUN / "stages/05-grpo/metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [2, 4, 6, 8]
    for m in steps:  # per reward, its mean and spread; KL, clipping, reply length, timings
        assert {"reward", "reward_std", "reward/exact", "reward/exact_std", "reward/format", "reward/rm",
                "kl", "clip_frac", "reply_tokens", "ended", "zero_std_groups", "rollout_s", "update_s"} <= set(m)
        assert 0 <= m["reward/format"] <= 1 and 0 < m["reply_tokens"] <= 12 and m["kl"] >= 0
    evals = [m for m in metrics if "val_reward" in m]
    assert [m["step"] for m in evals] == [0, 4, 8]
    result = cli("eval", RUN, "--stage", "grpo", "--json", cwd=trained)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)  # greedy replies to the held-out prompts, scored again
    assert scores["val_reward"] == pytest.approx(evals[-1]["val_reward"], rel=1e-5, abs=1e-6)
    assert scores["val_reward/exact"] == evals[-1]["val_reward/exact"]


def test_grpo_refuses_rewards_it_cannot_compute_before_training(tmp_path):
    """Problems only the tokenized data or the run's tokenizer show: still before any stage trains."""
    write_data(tmp_path)
    (tmp_path / "bare.jsonl").write_text("".join(json.dumps({"prompt": q["prompt"]}) + "\n" for q in questions()))
    other = tmp_path / "other-rm"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"stage": "rm", "kind": "reward", "language_model": False,
                                                   "tokenizer_fingerprint": "another"}))
    text = _edit(RECIPE, "  questions: {path: questions.jsonl,", "  questions: {path: bare.jsonl,")
    text = _edit(text, "{stage: rm, weight: 0.5}]", "{stage: rm, weight: 0.5}, {path: other-rm}]")
    (tmp_path / "recipe.yaml").write_text(text)
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any("stages[4].reward[0].verifier: exact checks replies against each prompt's reference answer, but 54 "
               "prompt(s) of data.questions have none (first: " in e for e in errors), errors
    assert any("stages[4].reward[3].path: the reward model in" in e and "another tokenizer" in e for e in errors), errors
    assert not (tmp_path / "runs/post/stages").exists()


# --- recipe errors ------------------------------------------------------------------------------------

def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


SFT_ONLY = RECIPE.split("  - name: dpo")[0] + "runtime: {log_every: 2, threads: 1}\n"
RECIPE_ERRORS = {
    "sft mixes text": (_edit(SFT_ONLY, "mix: {chat: 1.0}", "mix: {chat: 0.5, corpus: 0.5}"),
                       "stages[1].mix.corpus: an sft stage trains on chat, sharegpt, alpaca or prompt_response data; "
                       "source 'corpus' is text"),
    "no chat template": (_edit(SFT_ONLY, ", chat_template: default", ""),
                         "stages[1].kind: an sft stage needs tokenizer.chat_template"),
    "init names a later stage": (_edit(RECIPE, "    kind: sft\n", "    kind: sft\n    init: dpo\n"),
                                 "stages[1].init: 'dpo' is not an earlier stage"),
    "beta on pretrain": (_edit(RECIPE, "    kind: pretrain\n", "    kind: pretrain\n    beta: 0.1\n"),
                         "beta applies to dpo, kto, simpo and orpo stages, not pretrain"),
    "sft after a reward model": (_edit(RECIPE, "  - name: grpo\n", "  - {name: sft2, kind: sft, mix: {chat: 1.0}, "
                                       "steps: 2, batch_size: 4}\n  - name: grpo\n"),
                                 "stages[4].init: an sft stage trains a language model, but it would start from stage "
                                 "'rm', a reward model that only scores replies; set init: dpo"),
    "grpo without a reward": (_edit(RECIPE, "    reward: [{verifier: exact}, {verifier: format, weight: 0.5}, "
                                     "{stage: rm, weight: 0.5}]\n", ""),
                              "stages[4].reward: a grpo stage needs a reward"),
    "grpo rewarded by a dpo stage": (_edit(RECIPE, "{stage: rm, weight: 0.5}", "{stage: dpo}"),
                                     "stages[4].reward[2].stage: 'dpo' is not an earlier reward stage (earlier: rm)"),
    "grpo with one reply per prompt": (_edit(RECIPE, "    group: 4\n", "    group: 1\n"), "stages[4].group"),
    "task evals on a reward stage": (_edit(RECIPE, "    eval: {every: 6, tokens: 1024}", "    eval: {every: 6, tasks: "
                                           "[world-qa]}"), "stages[3].eval.tasks: task evals generate replies"),
}


@pytest.mark.parametrize("case", list(RECIPE_ERRORS))
def test_recipe_errors(tmp_path, case):
    text, message = RECIPE_ERRORS[case]
    write_data(tmp_path)
    (tmp_path / "recipe.yaml").write_text(text)
    result = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
