"""`llmforge report` and `llmforge compare`: a run's curves as PNGs and one self-contained HTML page,
and several runs side by side. Everything is read from the run directory (runs.py), so a report
can be made while the run goes on. matplotlib is the optional `plot` extra.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from ..errors import LlmforgeError
from ..store.runs import Run, final_figures, read_run
from .progress import duration, si
from .tables import figure, result_columns

# Panels of the preference and RL figures: (title, metric keys drawn in it).
_REWARD_PANELS = (("pairs ranked right", ("reward_acc", "accuracy")),
                  ("margin (chosen - rejected)", ("reward_margin", "margin", "log_odds")),
                  ("reward", ("reward", "reward_chosen", "reward_rejected", "reward_good", "reward_bad")),
                  ("KL to the reference", ("kl",)))
# Held-out figures, best first: the timeline draws the first one a stage has.
_HELD_OUT = ("val_bpb", "val_loss")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LlmforgeError("plots need matplotlib, which is not installed",
                            hint="pip install 'llmforge[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display is needed or opened
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.25, "font.size": 9, "axes.titlesize": 10,
                         "axes.titleweight": "bold", "legend.frameon": False, "legend.fontsize": 8})
    return plt


def _colors(plt, n: int) -> list:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _smooth(values: list[float], n: int) -> list[float]:
    """A centred moving mean over about n points: unlike an exponential average it does not lag
    behind a falling curve (pretraining's first hundred steps), so it stays on the raw one."""
    half = n // 2
    if half < 1:
        return values
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def _boundaries(ax, run: Run, label: bool) -> None:
    """Stages as alternately shaded bands over the whole planned timeline (stages not yet started
    too), with their names along the top."""
    for i, stage in enumerate(run.stages):
        if i % 2:
            ax.axvspan(stage.offset, stage.offset + stage.steps, color="0.94", zorder=0, lw=0)
        if stage.offset:
            ax.axvline(stage.offset, color="0.6", lw=0.8, ls="--", zorder=0)
        if label:
            ax.text(stage.offset + stage.steps / 2, 1.0, stage.name, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="0.3")
    end = run.stages[-1].offset + run.stages[-1].steps
    ax.set_xlim(0, max(end, 1))


def _timeline(plt, run: Run, path: Path) -> Path:
    """Train loss of every stage and its held-out figure, on one step axis."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.2), sharex=True, height_ratios=(3, 2))
    for stage, color in zip(run.stages, _colors(plt, len(run.stages))):
        x, y = stage.series("loss")
        if x:
            top.plot(x, y, color=color, alpha=0.25, lw=0.8)
            top.plot(x, _smooth(y, max(1, len(y) // 20)), color=color, lw=1.6, label=f"{stage.name} ({stage.kind})")
        key = next((k for k in _HELD_OUT if stage.series(k, evals=True)[0]), None)
        if key:
            x, y = stage.series(key, evals=True)
            bottom.plot(x, y, color=color, marker="o", ms=3, lw=1.4, label=f"{stage.name}: {key}")
    losses = [v for line in top.lines for v in line.get_ydata()]
    if losses and min(losses) > 0 and max(losses) > 8 * min(losses):  # pretraining's fall, then the rest
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        top.set_yscale("log")
        top.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        top.yaxis.set_minor_formatter(NullFormatter())
    top.set_ylabel("train loss (each stage's own)")  # nats/token for pretrain and sft; dpo's is its objective
    bottom.set_ylabel("held-out (bpb, or loss)")
    bottom.set_xlabel("step (stages in order)")
    _boundaries(top, run, label=True)
    _boundaries(bottom, run, label=False)
    top.legend(loc="upper right")
    if bottom.lines:
        bottom.legend(loc="upper right")
    fig.suptitle(f"{run.name}: loss", x=0.01, ha="left", fontweight="bold")
    return _save(fig, path)


def _lr(plt, run: Run, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 2.6))
    for stage, color in zip(run.stages, _colors(plt, len(run.stages))):
        x, y = stage.series("lr")
        ax.plot(x, y, color=color, lw=1.4, label=stage.name)
    ax.set_ylabel("learning rate")
    ax.set_xlabel("step (stages in order)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _boundaries(ax, run, label=True)
    fig.suptitle(f"{run.name}: learning-rate schedule", x=0.01, ha="left", fontweight="bold")
    return _save(fig, path)


def _throughput(plt, run: Run, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 2.6))
    mfu_ax = None
    for stage, color in zip(run.stages, _colors(plt, len(run.stages))):
        x, y = stage.series("tokens_per_s")
        ax.plot(x, y, color=color, lw=1.4, label=stage.name)
        x, y = stage.series("mfu")
        if x:
            mfu_ax = mfu_ax or ax.twinx()
            mfu_ax.plot(x, [100 * v for v in y], color=color, lw=1, ls=":")
    ax.set_ylabel("tokens/s")
    ax.set_xlabel("step (stages in order)")
    ax.legend(loc="lower right")
    if mfu_ax:
        mfu_ax.set_ylabel("MFU % (dotted)")
        mfu_ax.grid(False)
    _boundaries(ax, run, label=True)
    fig.suptitle(f"{run.name}: throughput", x=0.01, ha="left", fontweight="bold")
    return _save(fig, path)


def _rewards(plt, run: Run, path: Path) -> Path | None:
    """Preference and RL stages: ranking accuracy, margins, rewards, KL (panels with data only)."""
    panels = [(title, keys) for title, keys in _REWARD_PANELS
              if any(s.series(k)[0] for s in run.stages for k in keys)]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 * len(panels)), sharex=True, squeeze=False)
    styles = ("-", "--", ":", "-.")
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for stage, color in zip(run.stages, _colors(plt, len(run.stages))):
            for key, style in zip(keys, styles):
                x, y = stage.series(key)
                if x:
                    ax.plot(x, _smooth(y, max(1, len(y) // 20)), color=color, ls=style, lw=1.4,
                            label=f"{stage.name}: {key}")
        ax.set_title(title, loc="left")
        ax.legend(loc="best")
        _boundaries(ax, run, label=ax is axes[0, 0])
    # Only the stages with these figures (dpo's 100 steps after 1,000 of pretraining would be a sliver).
    shown = [s for s in run.stages if any(s.series(k)[0] for _, keys in panels for k in keys)]
    axes[0, 0].set_xlim(shown[0].offset, shown[-1].offset + max(shown[-1].steps, 1))
    axes[-1, 0].set_xlabel("step (stages in order)")
    fig.suptitle(f"{run.name}: preference and reward figures (train, smoothed)", x=0.01, ha="left",
                 fontweight="bold")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """report.html (plots embedded) and the PNGs beside it, in out_dir (default: the run directory)."""
    run = read_run(run_dir)
    if not any(s.train or s.evals for s in run.stages):
        raise LlmforgeError(f"{run_dir}: no stage has logged any metrics yet",
                            hint="make a report once the first stage has taken a step")
    plt = _pyplot()
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = [_timeline(plt, run, out / "loss.png"), _lr(plt, run, out / "lr.png"),
            _throughput(plt, run, out / "throughput.png"), _rewards(plt, run, out / "rewards.png")]
    pngs = [p for p in pngs if p]
    page = out / "report.html"
    page.write_text(_html(run, pngs))
    return [page, *pngs]


# -- several runs ----------------------------------------------------------------------------------
def compare_runs(run_dirs: list[Path]) -> tuple[list[Run], list[str], list[tuple[str, list[str]]],
                                                 list[tuple[str, list[str]]]]:
    """(runs, their labels, final figures as (row, value per run), recipe keys that differ as (key, value per run))."""
    if len(run_dirs) < 2:
        raise LlmforgeError("compare: give two or more run directories", hint="llmforge compare runs/a runs/b")
    runs = [read_run(p) for p in run_dirs]
    labels = [r.path.name for r in runs]
    if len(set(labels)) < len(labels):
        labels = [str(r.path) for r in runs]
    stage_names = list(dict.fromkeys(s.name for r in runs for s in r.stages))
    figures = {(r.path, s.name): final_figures(s) for r in runs for s in r.stages}
    rows = []
    for name in stage_names:
        columns = result_columns([f for (_, stage), f in figures.items() if stage == name])
        for key, heading, pct in columns:
            cells = []
            for r in runs:
                value = figures.get((r.path, name), {}).get(key)
                cells.append("-" if not isinstance(value, (int, float)) else f"{value:.1%}" if pct else f"{value:.4f}")
            rows.append((f"{name} {heading}", cells))
    flat = [_flatten(r.recipe) for r in runs]
    keys = sorted({k for f in flat for k in f}, key=lambda k: (k.split(".")[0] == "stages", k))
    differ = [(k, [f.get(k, "-") for f in flat]) for k in keys if len({f.get(k, "-") for f in flat}) > 1]
    return runs, labels, rows, [(k, v) for k, v in differ if k != "name"]


def _flatten(value, prefix: str = "") -> dict[str, str]:
    """Dotted keys as `--set` writes them; stages by name (stages.sft.optimizer.lr)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    if prefix == "stages." and isinstance(value, list) and all(isinstance(s, dict) and "name" in s for s in value):
        out = {}
        for s in value:
            out |= _flatten({k: v for k, v in s.items() if k != "name"}, f"stages.{s['name']}.")
        return out
    return {prefix[:-1]: str(value)}


def write_comparison(runs: list[Run], labels: list[str], path: Path) -> Path:
    """One PNG: each stage's held-out curve (bpb, else loss) in its own panel, one colour per run."""
    plt = _pyplot()
    names = list(dict.fromkeys(s.name for r in runs for s in r.stages))
    panels = []
    for name in names:
        stages = [next((s for s in r.stages if s.name == name), None) for r in runs]
        key = next((k for k in _HELD_OUT if any(s and s.series(k, evals=True)[0] for s in stages)), None)
        if key:
            panels.append((name, key, stages))
    if not panels:
        raise LlmforgeError("none of these runs has held-out figures yet",
                            hint="compare runs once their first eval has run")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 0.6, 2.9 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, key, stages) in zip(axes.flat, panels):
        for stage, label, color in zip(stages, labels, _colors(plt, len(runs))):
            if stage:
                x, y = stage.series(key, evals=True)
                ax.plot([v - stage.offset for v in x], y, color=color, marker="o", ms=3, lw=1.4, label=label)
        ax.set_title(f"{name}: {key}", loc="left")
        ax.set_xlabel("step")
    axes.flat[0].legend(loc="best")
    fig.suptitle("held-out curves", x=0.01, ha="left", fontweight="bold")
    return _save(fig, path)


# -- the page --------------------------------------------------------------------------------------
_CSS = """body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.6em;margin-bottom:.1em}h2{font-size:1.15em;margin-top:1.8em;
border-bottom:1px solid #ddd;padding-bottom:.2em}.sub{color:#666;margin-top:0}table{border-collapse:collapse;
font-variant-numeric:tabular-nums}th,td{padding:.25em .8em;text-align:right;border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left}td{white-space:nowrap}th{background:#f6f6f6}img{max-width:100%;margin:.6em 0}
.running{color:#b36b00;font-weight:bold}code{background:#f3f3f3;padding:0 .25em}"""


def _html(run: Run, pngs: list[Path]) -> str:
    status = ("finished" if run.done else
              f"<span class=running>running or stopped</span>: {_progress(run)}")
    model = (run.plan or {}).get("model", {})
    params = (run.plan or {}).get("params")
    head = (f"{model.get('family', '?')} {model.get('n_layer', '?')} layers x {model.get('n_embd', '?')}, "
            f"{_si(params)} params" if params else "")
    device = (run.plan or {}).get("device") or {}
    where = f" &middot; planned for {_e(str(device.get('name')))}, {_e(str(device.get('precision')))}" if device else ""
    figures = [{"stage": f"{s.name} ({s.kind})"} | final_figures(s) for s in run.stages if final_figures(s)]
    columns = result_columns(figures)
    results, benchmarks = ([c for c in columns if c[0].startswith("lm-eval/") == harness] for harness in (False, True))
    results = _table(["stage"] + [h for _, h, _ in results],
                     [[f["stage"]] + [figure(f, k, pct) for k, _, pct in results] for f in figures])
    bench = [f for f in figures if any(k in f for k, _, _ in benchmarks)]
    benchmarks = f"""<h2>Benchmarks</h2>{_table(["stage"] + [h for _, h, _ in benchmarks],
                                               [[f["stage"]] + [figure(f, k, pct) for k, _, pct in benchmarks]
                                                for f in bench])}
<p class=sub>lm-evaluation-harness tasks on each stage's final weights (eval.tasks, or `llmforge eval
--tasks` since): shares of documents as percentages.</p>""" if bench else ""
    images = "\n".join(f'<img alt="{p.stem}" src="data:image/png;base64,'
                       f'{base64.b64encode(p.read_bytes()).decode()}">' for p in pngs)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{_e(run.name)}: llmforge report</title>
<style>{_CSS}</style></head><body>
<h1>{_e(run.name)}</h1><p class=sub>{_e(str(run.path))} &middot; {status} &middot; {_e(head)}
{where}</p>
<h2>Results on held-out data</h2>{results if figures else "<p>no stage has been evaluated yet</p>"}
<p class=sub>Each stage's final figures (a stage still running: its latest eval). bpb is bits per byte
of text, comparable across tokenizers.</p>
{benchmarks}
<h2>Curves</h2>{images}
<h2>Plan</h2>{_plan_table(run)}
</body></html>
"""


def _plan_table(run: Run) -> str:
    planned = {sp["dir_name"]: sp for sp in (run.plan or {}).get("stages", [])}
    rows = []
    for s in run.stages:
        sp = planned.get(s.dir_name, {})
        batch = (f"{sp['micro_batch']} x {sp['grad_accum']} x {sp['world_size']}" if sp else "?")
        rows.append([s.name, s.kind, f"{s.last_step:,} / {s.steps:,}", _si(sp.get("tokens")),
                     f"{sp.get('global_batch', '?')} x {sp.get('seq_len', '?')}", batch,
                     f"{sp['lr']:.3g}" if sp else "?", _gib(sp.get("est_peak_memory_bytes")),
                     _hours(sp.get("est_time_s")), _hours(s.seconds)])
    return _table(["stage", "kind", "steps done", "tokens", "batch x seq", "micro x accum x world", "lr",
                   "est. memory", "est. time", "took"], rows)


def _progress(run: Run) -> str:
    started = [s for s in run.stages if s.train or s.evals]
    last = started[-1] if started else run.stages[0]
    return f"stage {_e(last.name)} at step {last.last_step:,} of {last.steps:,}"


def _table(headings: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f"<td>{_e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _si(n) -> str:
    return si(n) if isinstance(n, (int, float)) else "?"


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "?"


def _hours(seconds) -> str:
    return duration(seconds) if isinstance(seconds, (int, float)) else "-"
