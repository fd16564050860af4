"""What durability costs: a quickstart checkpoint saved with and without its fsyncs, and how
long checking a checkpoint or a token cache entry against its checksums takes.

    python benchmarks/durability.py [--rounds 15]

The quickstart's model (recipes/quickstart.yaml: 2.1M parameters) after one AdamW step, so the
checkpoint holds weights and both moments, as a real one does. The two ways of saving alternate
round by round on the same disk (the run directory's, under /tmp unless --dir says otherwise);
medians are printed, and the difference is the fsyncs' cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from llmforge.core import durable
    from llmforge.model.families import PRESETS
    from llmforge.model.transformer import ModelConfig, Transformer
    from llmforge.model.weights import weight_names
    from llmforge.recipe.loader import load_recipe
    from llmforge.run.distributed import full_state
    from llmforge.store import checkpoint

    args = argparse.ArgumentParser()
    args.add_argument("--rounds", type=int, default=15)
    args.add_argument("--dir", type=Path, default=None)
    opts = args.parse_args()
    recipe = load_recipe(REPO / "recipes/quickstart.yaml", [])
    fields = recipe.model.model_dump(exclude_none=True)
    preset = PRESETS[fields.pop("preset")]
    cfg = ModelConfig(**(preset | {k: v for k, v in fields.items() if k in ModelConfig.__dataclass_fields__})
                      | {"vocab_size": recipe.tokenizer.vocab_size})
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    model(x).float().mean().backward()
    optimizer.step()
    weights, state = full_state(model, optimizer)
    weights = {k: v for k, v in weights.items() if k in weight_names(model)}  # tied: stored once
    root = Path(tempfile.mkdtemp(dir=opts.dir, prefix="durability-"))
    times = {"with fsync": [], "without fsync": []}
    try:
        for r in range(opts.rounds):
            for how in (times if r % 2 == 0 else reversed(list(times))):
                shutil.rmtree(root / "checkpoints", ignore_errors=True)
                patch = mock.patch.object(durable, "fsync", lambda p: None) if how == "without fsync" \
                    else mock.patch.object(durable, "fsync", durable.fsync)
                with patch:
                    t = time.perf_counter()
                    path = checkpoint.save_checkpoint(root / "checkpoints", 100, weights, state, {}, keep=2)
                    times[how].append(time.perf_counter() - t)
        size = sum(f.stat().st_size for f in path.iterdir())
        checks = []
        for _ in range(opts.rounds):
            t = time.perf_counter()
            assert durable.damage(path) is None
            checks.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"quickstart model: {cfg.num_params() / 1e6:.1f}M params; a checkpoint is {size / 2**20:.1f} MiB "
          f"(weights + AdamW moments), on {os.path.realpath(root.parent)}")
    for k, v in times.items():
        print(f"  save {k:>14}: median {med[k]:6.1f} ms  (min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f}, "
              f"{len(v)} rounds)")
    print(f"  fsync cost: {med['with fsync'] - med['without fsync']:+.1f} ms a checkpoint "
          f"({med['with fsync'] / med['without fsync']:.2f}x)")
    print(f"  checking it against checksums.json on resume: median {statistics.median(checks) * 1000:.1f} ms "
          f"({size / statistics.median(checks) / 2**30:.2f} GiB/s; a token cache entry is checked the same way)")


if __name__ == "__main__":
    main()
