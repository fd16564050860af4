"""The time-to-quality reference: nanoGPT's CPU configuration for character-level Tiny Shakespeare,
reimplemented in one file (nanoGPT itself is not installable offline).

What nanoGPT's README runs on a laptop:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
      --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

i.e. a GPT-2 style model (learned positions, LayerNorm without bias, exact GELU MLP 4x, tied
embeddings, linear layers without bias, N(0, 0.02) init with the residual projections scaled by
1/sqrt(2 n_layer)) on 65 characters; AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on
matrices, 100 warmup steps, cosine to 1e-4 at 2000, grad clip 1.0; random windows of 64 from the
first 90% of the text, 12 per step; every 250 steps the mean loss of 20 random batches per split.
It quotes validation loss 1.88 (2.72 bits per byte: the text is ASCII, one byte per character).

    python benchmarks/nanogpt_reference.py [--data ../shared/data/tinyshakespeare.txt]

prints the curve, the wall time from start (torch import included) and the final validation loss,
also measured on the whole held-out 10% so it compares with llmforge's figure.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before importing torch: what a user waits for counts

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LAYERS, HEADS, WIDTH, CONTEXT, BATCH, ITERS = 4, 4, 128, 64, 12, 2000
LR, MIN_LR, WARMUP, BETAS, DECAY, CLIP = 1e-3, 1e-4, 100, (0.9, 0.99), 0.1, 1.0
EVAL_EVERY, EVAL_ITERS = 250, 20


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH, bias=False), nn.LayerNorm(WIDTH, bias=False)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
        self.fc, self.out = nn.Linear(WIDTH, 4 * WIDTH, bias=False), nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def lr_at(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > ITERS:
        return MIN_LR
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * (it - WARMUP) / (ITERS - WARMUP))) * (LR - MIN_LR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    args = ap.parse_args()
    text = Path(args.data).read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    splits = {"train": ids[:n], "val": ids[n:]}
    torch.manual_seed(1337)
    model = GPT(len(chars))
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)

    def batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - CONTEXT, (BATCH,))
        x = torch.stack([torch.from_numpy(data[i:i + CONTEXT].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + CONTEXT].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate():
        model.eval()
        out = {s: float(np.mean([model(*batch(s)).item() for _ in range(EVAL_ITERS)])) for s in splits}
        model.train()
        return out

    print(f"{'iter':>5} {'seconds':>8} {'train':>7} {'val':>7} {'val bpb':>8}")
    for it in range(ITERS + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        if it % EVAL_EVERY == 0:
            losses = estimate()
            print(f"{it:>5} {time.perf_counter() - START:>8.1f} {losses['train']:>7.4f} {losses['val']:>7.4f} "
                  f"{losses['val'] / math.log(2):>8.4f}", flush=True)
        loss = model(*batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - START
    # The whole held-out split, in windows of CONTEXT (as llmforge's full-split figure).
    with torch.no_grad():
        model.eval()
        val = torch.from_numpy(splits["val"].astype(np.int64))
        w = (len(val) - 1) // CONTEXT
        x, y = val[:w * CONTEXT].view(w, CONTEXT), val[1:w * CONTEXT + 1].view(w, CONTEXT)
        full = sum(model(x[i:i + 256], y[i:i + 256]).item() * len(x[i:i + 256]) for i in range(0, w, 256)) / w
    print("RESULT " + json.dumps({"wall_s": wall, "val_bpb_sampled": losses["val"] / math.log(2),
                                  "val_bpb_full": full / math.log(2), "tokens": (ITERS + 1) * BATCH * CONTEXT}))
    print(f"\nnanoGPT reference: {ITERS} iterations in {wall:.1f} s wall (from start, torch import included); "
          f"val loss {losses['val']:.4f} ({losses['val'] / math.log(2):.4f} bpb) on 20 random batches, "
          f"{full:.4f} ({full / math.log(2):.4f} bpb) on the whole held-out 10%")


if __name__ == "__main__":
    main()
