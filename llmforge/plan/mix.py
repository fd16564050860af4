"""A stage's data as the plan sees it: what each source holds (`SourceStats`, from the cache or
estimated), how many rows of this stage's kind it makes, and what the stage takes from it
(`SourcePlan`); the mistakes that would waste compute (examples that teach nothing, a source
passed over more often than its epochs allow) are plan errors here."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.sampler import windows_per_epoch
from ..errors import PlanError
from ..stages import KINDS


@dataclass(frozen=True)
class SourceStats:
    documents: int | None
    train_tokens: int
    val_tokens: int
    estimated: bool = False
    skipped: int = 0  # bad records skipped (on_error: skip)
    filtered: int = 0  # documents outside min_chars..max_chars
    reasons: dict = field(default_factory=dict)  # the skipped and filtered records' reasons -> counts
    examples: object = None  # conversation sources: the training split's Examples (data/rows.py)
    val_examples: object = None  # ... and the held-out split's
    missing: str = ""  # `plan` only: why the source's files are not at hand (planned without them)
    conversations: bool = False  # estimated from file sizes, a conversation source (examples not tokenized yet)


@dataclass(frozen=True)
class SourcePlan:
    name: str
    weight: float  # normalized share of the stage's tokens
    documents: int | None
    train_tokens: int
    val_tokens: int
    take_tokens: int  # tokens this stage draws from the source (row capacity, for sft/dpo)
    epochs: float  # passes over the source's rows
    estimated: bool  # token counts estimated from bytes: the source is not tokenized yet
    skipped: int = 0
    filtered: int = 0
    rows: int = 0  # rows per epoch: windows (pretrain), packed sequences (sft), pairs (dpo)
    dropped: int = 0  # examples longer than seq_len+1 left out (overlong: drop)
    truncated: int = 0  # examples cut to seq_len+1 tokens (overlong: truncate)
    missing: bool = False  # `plan` of data not at hand
    reasons: dict = field(default_factory=dict)  # why skipped and filtered records went -> how many


def source_rows(where, spec, name, st: SourceStats, seq_len: int, options, seed: int) -> tuple[int, int, int, float]:
    """(rows per epoch, dropped, truncated, logit share) of a source in this stage; examples that
    would teach nothing are an error here, before any compute is spent."""
    kind = KINDS[spec.kind]
    if st.missing:  # not at hand (`plan` before the data is downloaded): nothing to count
        return 0, 0, 0, 1.0
    source = None if st.examples is None else kind.rows(st.examples, seq_len, options, seed)
    if source is None and st.conversations:  # examples not tokenized yet: as packed rows, the last partly filled
        return max(1, -(-st.train_tokens // seq_len)), 0, 0, 1.0
    if source is None:  # windows of a token stream: estimate
        if st.train_tokens < seq_len + 1:
            raise PlanError(f"{where}.mix.{name}: the source has {st.train_tokens} training tokens, "
                            f"fewer than one window of seq_len+1 = {seq_len + 1}",
                            hint="add data to the source or use a shorter seq_len")
        return windows_per_epoch(st.train_tokens, seq_len), 0, 0, 1.0
    lay = source.layout
    if len(lay.empty):
        raise PlanError(f"{where}.mix.{name}: {len(lay.empty)} example(s) have no {kind.learns} within seq_len+1 = "
                        f"{seq_len + 1} tokens, so training on them would learn nothing "
                        f"(first: {st.examples.origins(int(lay.empty[0]))})",
                        hint=f"set {where}.overlong: drop, raise seq_len, or shorten those examples")
    if lay.n_rows == 0:
        raise PlanError(f"{where}.mix.{name}: all {len(st.examples)} examples are longer than seq_len+1 = "
                        f"{seq_len + 1} tokens and overlong: drop leaves none", hint="raise seq_len")
    return lay.n_rows, lay.dropped, lay.truncated, kind.logit_share(source)


def plan_mix(where, mix: dict, sources: dict, specs: dict, rows: dict, total_rows: int,
              per_row: int) -> tuple[SourcePlan, ...]:
    total = sum(mix.values())
    out = []
    for name, weight in mix.items():
        st, (n_rows, dropped, truncated, _) = sources[name], rows[name]
        take = round(total_rows * weight / total)
        epochs = take / n_rows if n_rows else float("nan")  # as the sampler walks it (nan: not at hand)
        cap = specs[name].epochs
        if cap is not None and epochs > cap and not st.estimated:
            raise PlanError(f"{where}.mix.{name}: the stage takes {take * per_row:,} tokens from {name!r}, "
                            f"{epochs:.2f} passes over its {st.train_tokens:,} training tokens; "
                            f"data.{name}.epochs allows {cap:g}",
                            hint=f"add data, lower its weight or the stage's budget, or raise data.{name}.epochs")
        out.append(SourcePlan(name, weight / total, st.documents, st.train_tokens, st.val_tokens, take * per_row,
                              epochs, st.estimated, st.skipped, st.filtered, n_rows, dropped, truncated,
                              bool(st.missing), st.reasons))
    return tuple(out)


def held_out_fits(sp, st: SourceStats, seed: int) -> str:
    """'' if the stage can eval on the source, else what is missing (a window, an example that fits)."""
    if st.val_examples is None:
        if st.conversations:  # not tokenized yet: any held-out example may fit
            return "" if st.val_tokens else "example within"
        return "" if st.val_tokens >= sp.seq_len + 1 else "window of"
    rows = KINDS[sp.kind].rows(st.val_examples, sp.seq_len, sp.options, seed, overlong="drop")
    return "" if rows is None or rows.n_rows else "example within"


def missing_warning(why: str, unknown: list[str]) -> str:
    """The warning for a source not at hand; `unknown`: the stages whose steps count its examples."""
    steps = f"; the steps of {', '.join(unknown)} count its examples: unknown until then" if unknown else ""
    return f"{why}; planned from the stages' budgets without it (`llmforge run` needs it{steps})"
