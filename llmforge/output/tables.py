"""What llmforge prints as tables: the plan (`plan`, and `run` before training), a stage's mask
preview, the held-out results at the end of a run, and `compare`'s side by side."""

from __future__ import annotations

import itertools

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..model.recompute import checkpointed_blocks, recompute_share
from ..tasks import task_columns
from .progress import duration, si


def render_plan(plan, console: Console) -> None:
    """Print every derived number of a plan."""
    from ..optim import OPTIMIZERS  # torch; plan and run have it already, report and compare need it not

    d, m = plan.device, plan.model
    console.print(f"[bold]plan[/] {plan.name}: {d.type} ({d.name}), {d.precision}"
                  f"{', compiled' if d.compile else ''}, {d.memory_bytes / 2**30:.0f} GiB", highlight=False)
    extras = [name for name, on in (("q/k/v biases", m.qkv_bias), ("q/k norms", m.qk_norm),
                                    ("llama3 rope scaling", m.rope_scaling),
                                    (f"sliding window {m.sliding_window}", m.sliding_window)) if on]
    console.print(f"model: {m.family}, {m.n_layer} layers, {m.n_head} heads ({m.kv_heads} kv) of {m.head_dim}, "
                  f"{m.n_embd} wide, seq_len {m.seq_len}, vocab {m.vocab_size}, {m.norm}/{m.positions}/{m.mlp}"
                  f"{', tied' if m.tie_embeddings else ''}{''.join(', ' + e for e in extras)}"
                  f"{f' (from {plan.model_init})' if plan.model_init else ''} -> {si(plan.params)} params "
                  f"({si(plan.params_non_embedding)} non-embedding), {si(plan.flops_per_token)} FLOPs/token",
                  highlight=False)
    if plan.world_size > 1:
        how = {"ddp": "DDP, each holds the whole model", "fsdp": "FSDP2, weights/grads/optimizer state sharded"}
        console.print(f"parallel: {plan.parallel} over {plan.world_size} processes "
                      f"({'nccl' if d.type == 'cuda' else 'gloo'}; {how[plan.parallel]}); memory below is per device",
                      highlight=False)
    for sp in plan.stages:
        eta = f", ~{duration(sp.est_time_s)}" if sp.est_time_s else ""
        own = OPTIMIZERS[sp.optimizer["name"]].describe(sp.optimizer)
        # steps 0: an epochs budget over data not at hand (`plan` before the download)
        steps = f"{sp.steps} steps x {sp.batch_tokens:,} tokens = {si(sp.tokens)}" if sp.steps else \
            f"? steps (its data is not at hand) x {sp.batch_tokens:,}"
        schedule = f"warmup {sp.warmup_steps} steps, {sp.decay} decay to {sp.min_lr:.3g} over " \
                   f"{sp.steps - sp.warmup_steps} steps" if sp.steps else f"warmup, then {sp.decay} decay to {sp.min_lr:.3g}"
        console.print(
            f"[bold]stage {sp.dir_name}[/] ({sp.kind}): {steps} tokens\n"
            f"  batch {sp.global_batch} x {sp.seq_len} = micro {sp.micro_batch} x accum {sp.grad_accum} "
            f"x world {sp.world_size}{_checkpointing(sp, plan)}\n"
            f"{f'  seq_len {sp.seq_len}: {sp.seq_len_from}{chr(10)}' if sp.seq_len_from else ''}"
            f"  {sp.optimizer['name']} lr {sp.lr:.3g}{own}, {schedule}, "
            f"weight decay {sp.optimizer['weight_decay']}, clip {sp.optimizer['grad_clip']}\n"
            f"{_adapter_line(sp, plan)}"
            f"  eval every {sp.eval_every or 'end'} on {sp.eval_tokens:,} tokens; checkpoint every "
            f"{sp.checkpoint_every or 'end'}, keep {sp.checkpoint_keep}\n"
            f"  {f'{sp.flops:.2e}' if sp.steps else '?'} FLOPs, est. peak memory "
            f"{sp.est_peak_memory_bytes / 2**30:.2f} GiB{eta}",
            highlight=False)
        table = Table(box=None, padding=(0, 2), show_edge=False)
        dropped = any(s.skipped or s.filtered for s in sp.mix)
        overlong = any(s.dropped or s.truncated for s in sp.mix)
        for col in ("source", "weight", "docs", "train tokens", "val tokens", "stage takes", "epochs") + \
                (("skipped", "filtered") if dropped else ()) + (("too long: dropped", "truncated") if overlong else ()):
            table.add_column(col, justify="left" if col == "source" else "right")
        for s in sp.mix:
            approx, gone = "~" if s.estimated else "", "missing" if s.missing else None
            table.add_row(s.name, f"{s.weight:.2f}", f"{s.documents:,}" if s.documents is not None else "?",
                          gone or f"{approx}{s.train_tokens:,}", gone or f"{approx}{s.val_tokens:,}",
                          f"{s.take_tokens:,}" if sp.steps else "?", "?" if s.missing else f"{approx}{s.epochs:.2f}", *((f"{s.skipped:,}", f"{s.filtered:,}") if dropped else ()),
                          *((f"{s.dropped:,}", f"{s.truncated:,}") if overlong else ()))
        console.print(table)
        for s in sp.mix:
            if s.reasons:
                console.print(f"  {escape(s.name)} left out: " + escape("; ".join(
                    f"{n:,} {why}" for why, n in sorted(s.reasons.items(), key=lambda r: -r[1]))), highlight=False)
        if sp.name in plan.previews:
            render_preview(plan.previews[sp.name], console)
    for note in plan.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if any(s.estimated and not s.missing for sp in plan.stages for s in sp.mix):
        console.print("~ estimated from file sizes; exact once `llmforge run` has tokenized the data", highlight=False)



def _checkpointing(sp, plan) -> str:
    """What activation checkpointing the stage runs with, and its cost."""
    mode = sp.activation_checkpointing
    if mode == "none":
        return ""
    n = plan.model.n_layer
    return (f"; activation checkpointing {mode}: {checkpointed_blocks(n, mode)} of {n} blocks recompute their "
            f"forward in backward, ~{recompute_share(plan.model, mode, sp.seq_len):.0%} more compute")


def _adapter_line(sp, plan) -> str:
    """What an adapter trains, and how large a model this device could train with it and without."""
    if not sp.adapter:
        return ""
    from ..plan.estimates import memory_budget

    a, share = sp.adapter, sp.trainable_params / plan.params
    # Weights and optimizer states alone: full training 16 bytes a weight; with a frozen base 4,
    # plus 16 for each adapter weight (the same share of the model as here).
    budget = memory_budget(plan.device)
    return (f"  {a['kind']} rank {a['rank']}, alpha {a['alpha']:g}{', rslora' if a['rslora'] else ''} on "
            f"{', '.join(a['targets'])}: {si(sp.trainable_params)} trainable ({share:.2%} of the "
            f"{si(plan.params)} frozen); this device fits ~{si(budget / 16)} params "
            f"in full training, ~{si(budget / (4 + 16 * share))} with this adapter (weights and states)\n")


def render_preview(segments: list, console: Console) -> None:
    """One training example through the chat template: learned text highlighted (bold green on a
    terminal, between [[ ]] elsewhere), the prompt dim; special tokens as written."""
    out = Text("  example, learned tokens highlighted: " if console.is_terminal else
               "  example, learned tokens in [[ ]]: ")
    if console.is_terminal:
        for text, special, learned in segments:
            out.append(text, style=("bold green" if learned else "dim") + (" italic" if special else ""))
    else:  # consecutive learned segments share one pair of brackets
        for learned, group in itertools.groupby(segments, key=lambda s: s[2]):
            text = "".join(t for t, _, _ in group)
            out.append(f"[[{text}]]" if learned else text)
    console.print(out, highlight=False)


# Columns of the results table: (metric key, heading, as a percentage).
_RESULT_COLUMNS = (("val_loss", "val loss", False), ("val_bpb", "val bpb", False),
                   ("val_reward_acc", "reward acc", True), ("val_accuracy", "pairs ranked", True),
                   ("val_reward", "reward", False), *((key, heading, True) for key, heading in task_columns()))


def result_columns(results: list[dict]) -> list[tuple[str, str, bool]]:
    """(metric key, heading, as a percentage) of the figures any of these results has."""
    columns = [c for c in _RESULT_COLUMNS if any(c[0] in r for r in results)]
    extra = sorted({k for r in results for k in r if "/" in k and not k.startswith(("val", "data/"))}
                   - {c[0] for c in columns})
    return columns + [(k, *_heading(k)) for k in extra]  # other tasks' scores


# lm-eval's metrics that are shares of documents (others are perplexities, bits per byte...)
_SHARES = ("acc", "acc_norm", "exact_match", "f1", "em", "mc1", "mc2", "pass@1")


def _heading(key: str) -> tuple[str, bool]:
    """A task figure's column heading, and whether it is a share: "lm-eval/arc_easy/acc_norm" ->
    ("arc_easy acc_norm", True)."""
    if key.startswith("lm-eval/"):
        _, task, metric = key.split("/", 2)
        return f"{task} {metric}", metric.split(":")[0] in _SHARES
    return key, True


def figure(result: dict, key: str, share: bool) -> str:
    """One figure as the results tables show it: a share as a percentage, else 4 decimals (a
    perplexity in the billions, 4 significant digits); "-" where the stage has none."""
    if key not in result:
        return "-"
    value = result[key]
    return f"{value:.0%}" if share else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def render_results(results: list[dict], console: Console, title: str = "results on held-out data") -> None:
    """One row per stage with its final held-out figures (columns no stage has are left out)."""
    columns = result_columns(results)
    if not results or not columns:
        return
    table = Table(title=title, box=None, padding=(0, 2), show_edge=False, title_justify="left")
    table.add_column("stage")
    for _, heading, _ in columns:
        table.add_column(heading, justify="right")
    for r in results:
        cells = [figure(r, k, pct) for k, _, pct in columns]
        table.add_row(f"{r['stage']} ({r['kind']})" if "kind" in r else r["stage"], *cells)
    console.print(table)


def render_comparison(labels: list[str], rows: list, differ: list, console: Console) -> None:
    """Final figures per stage, one column per run; then the recipe keys that differ."""
    for title, first, body in (("final held-out figures", "stage, figure", rows),
                               ("recipe keys that differ", "key", differ)):
        table = Table(title=title, box=None, padding=(0, 2), show_edge=False, title_justify="left")
        table.add_column(first)
        for label in labels:
            table.add_column(escape(label), justify="right")
        for key, cells in body:  # values are the user's text: never markup
            table.add_row(escape(key), *map(escape, cells))
        if body:
            console.print(table)
        else:
            console.print(f"{title}: none", highlight=False)
