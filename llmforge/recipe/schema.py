"""The recipe schema (v1): pydantic models with extra="forbid", so a typo is an error, never ignored.

Each component gets its own small spec (TokenizerSpec, ModelSpec, SourceSpec, StageSpec, ...);
nothing downstream receives the whole recipe unless it truly needs all of it.
Cross-references between sections (mix -> data sources) are checked in `loader.py`, on the raw
data, so that they are reported together with field errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (BeforeValidator, Discriminator, Field, PrivateAttr, Tag, WithJsonSchema, create_model,
                      model_validator)

from ..core.values import (AutoOrPositive, Count, Float, Fraction, Int, Name, NumberOrPercent, PositiveCount, Spec,
                           StepsOrPercent)
from ..data.spec import SourceSpec
from ..model.families import FAMILIES, PRESETS
from ..optim import OPTIMIZERS
from ..stages import KINDS
from ..tasks import LM_EVAL_TASK, TASKS


class ChatTemplateSpec(Spec):
    """The special tokens that frame each turn of a conversation (see llmforge/text/chat.py)."""
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"  # closes every turn; generation stops when the assistant emits it

    @model_validator(mode="after")
    def _distinct(self):
        tokens = [self.system, self.user, self.assistant, self.end]
        if len(set(tokens)) != 4 or not all(t and not any(c.isspace() for c in t) for t in tokens):
            raise ValueError("the four chat tokens must be distinct, non-empty, and without spaces")
        return self


class NamedTemplateSpec(Spec):
    name: Literal["chatml", "llama3"]


class TemplateFileSpec(Spec):
    # A Jinja chat template: a .jinja file, a tokenizer_config.json with chat_template, or a model
    # folder holding either; its special tokens are those of the tokenizer.json beside it.
    path: str


def _template(value):
    if value == "default":
        return {}
    return {"name": value} if isinstance(value, str) else value


_TEMPLATE_JSON = {"anyOf": [{"enum": ["default", "chatml", "llama3"]}, ChatTemplateSpec.model_json_schema(),
                            TemplateFileSpec.model_json_schema()]}


class TokenizerSpec(Spec):
    type: Literal["bpe", "unigram", "char", "bytelevel_bpe"] = "bpe"
    vocab_size: PositiveCount | None = None
    # An existing tokenizer instead of training one: a sentencepiece .model file or a Hugging
    # Face tokenizer.json.
    path: str | None = None
    byte_fallback: bool = True
    train_on: list[str] | None = None  # source names; default: every source a stage mixes
    sample_bytes: PositiveCount = 10_000_000
    # 'default' (<|system|> <|user|> <|assistant|> <|end|>), your own four tokens, 'chatml'
    # (<|im_start|>role ... <|im_end|>), 'llama3' (Llama 3's headers and <|eot_id|>), or {path: ...}
    # a Jinja template. A trained tokenizer gets the template's special tokens. Needed by sft and dpo
    # stages; with model.init.hf and no tokenizer section, the model's own template is used.
    chat_template: Annotated[ChatTemplateSpec | NamedTemplateSpec | TemplateFileSpec, BeforeValidator(_template),
                             WithJsonSchema(_TEMPLATE_JSON)] | None = None

    @model_validator(mode="after")
    def _one_way(self):
        if self.path is None and self.vocab_size is None:
            raise ValueError("give vocab_size (to train a tokenizer) or path (to load a .model or tokenizer.json file)")
        if self.path is not None and self.vocab_size is not None:
            raise ValueError("give vocab_size or path, not both (a loaded tokenizer has its own vocab)")
        if isinstance(self.chat_template, TemplateFileSpec) and self.path is None:
            raise ValueError("a chat_template from a file needs the tokenizer it was written for: give tokenizer.path "
                             "(or name a template: default, chatml, llama3)")
        return self


class ModelInitSpec(Spec):
    hf: str  # a local transformers folder (config.json, model.safetensors, tokenizer.json or .model)


class RopeScalingSpec(Spec):
    """Llama 3.1's long-context rope (rope_type llama3 in a transformers config)."""
    type: Literal["llama3"] = "llama3"
    factor: Float = Field(gt=0)
    low_freq_factor: Float = Field(default=1.0, gt=0)
    high_freq_factor: Float = Field(default=4.0, gt=0)
    original_max_position_embeddings: Int = Field(gt=0)

    @model_validator(mode="after")
    def _order(self):
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be larger than low_freq_factor")
        return self


class ModelSpec(Spec):
    # Start from a local Hugging Face model: the loader fills the keys below from its config.json
    # (any given must agree) and takes its tokenizer.model.
    init: ModelInitSpec | None = None
    # The architecture, and the Hugging Face family `export` writes: llama, gpt2, qwen2 (llama with
    # q/k/v biases), qwen3 (llama with q/k norms), mistral and phi3 (llama; a sliding window if set).
    preset: Literal[tuple(FAMILIES)] = "llama"
    n_layer: Int = Field(gt=0)
    n_head: Int = Field(gt=0)
    n_embd: Int = Field(gt=0)
    seq_len: Int = Field(gt=1)
    n_kv_head: Int | None = Field(default=None, gt=0)
    # None means "what the preset says".
    norm: Literal["rmsnorm", "layernorm"] | None = None
    positions: Literal["rope", "learned"] | None = None
    mlp: Literal["swiglu", "gelu"] | None = None
    mlp_hidden: Int | None = Field(default=None, gt=0)
    tie_embeddings: bool | None = None
    bias: bool | None = None
    dropout: Float = Field(default=0.0, ge=0, lt=1)
    rope_theta: Float = Field(default=10000.0, gt=0)
    norm_eps: Float | None = Field(default=None, gt=0)
    head_dim: Int | None = Field(default=None, gt=0)  # default n_embd / n_head
    qkv_bias: bool | None = None  # biases on q, k, v only (qwen2's default)
    qk_norm: bool | None = None  # RMSNorm on each head's queries and keys (qwen3's default)
    rope_scaling: RopeScalingSpec | None = None
    sliding_window: Int | None = Field(default=None, gt=0)  # attend to at most this many recent tokens
    # Rows of the embedding (and output) matrix; default: the tokenizer's vocab. Larger pads it
    # (e.g. to a multiple of 64 for GPU kernels, or as an imported model has it).
    vocab_size: Int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _shapes(self):
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or give head_dim")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        positions = self.positions or PRESETS[self.preset]["positions"]
        head = self.head_dim or self.n_embd // self.n_head
        if positions == "rope" and head % 2:
            raise ValueError(f"rope needs an even head size; it is {head}")
        if self.rope_scaling is not None and positions != "rope":
            raise ValueError("rope_scaling needs positions: rope")
        return self


def _optimizer_fields() -> dict:
    """Each registered optimizer's own keys, with its defaults: one key, one meaning (two optimizers
    giving one key different types or defaults would leave the spec holding only the last)."""
    fields = {}
    for o in OPTIMIZERS.values():
        for key, f in o.Options.model_fields.items():
            if key in fields and (fields[key][0], fields[key][1].default) != (f.annotation, f.default):
                raise TypeError(f"optimizer key {key!r} differs between optimizers ({o.name} and another)")
            fields[key] = (f.annotation, f)
    return fields


# The optimizer: the keys every one has, and each registered optimizer's own with its default
# (llmforge/optim/: muon_lr is Muon's), which the others ignore.
OptimizerSpec = create_model(
    "OptimizerSpec", __base__=Spec,
    name=(Literal[tuple(OPTIMIZERS)], "adamw"),
    lr=(Float, Field(default=3e-4, gt=0)),
    **_optimizer_fields(),
    betas=(tuple[Annotated[Float, Field(ge=0, lt=1)], Annotated[Float, Field(ge=0, lt=1)]], (0.9, 0.95)),
    eps=(Float, Field(default=1e-8, gt=0)),
    weight_decay=(Float, Field(default=0.1, ge=0)),
    grad_clip=(Float | None, Field(default=1.0, gt=0)),  # max global grad norm; null turns it off
)


class ScheduleSpec(Spec):
    warmup: StepsOrPercent = 0  # steps, or a share of the stage's steps
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr: NumberOrPercent = "10%"  # absolute, or a share of optimizer.lr


class LmEvalSpec(Spec):
    """How a stage's lm-eval tasks run (llmforge/tasks/harness.py)."""
    limit: PositiveCount | None = None  # at most this many documents of each task
    num_fewshot: Count | None = None  # examples in each prompt (default: the task's own)
    apply_chat_template: bool = False  # prompt through the chat template, as lm-eval's --apply_chat_template
    include_path: str | None = None  # a folder of task YAMLs of your own (relative to the recipe)


class EvalSpec(Spec):
    every: Count = 0  # steps between evals; 0: only at the start and the end
    tokens: PositiveCount = 65536  # held-out tokens per eval
    # task evals run once the stage is done (generation: slower): llmforge's, and lm-eval's named lm-eval:TASK
    tasks: list[Literal[tuple(TASKS)] | Annotated[str, Field(pattern=LM_EVAL_TASK)]] = []
    lm_eval: LmEvalSpec = LmEvalSpec()


class CheckpointSpec(Spec):
    every: Count = 0  # steps between checkpoints; 0: only at the end
    keep: Int = Field(default=3, ge=1)  # newest checkpoints kept per stage


_TARGETS = ("attn", "mlp", "all-linear", "q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "c_fc", "c_proj",
            "gate_proj", "up_proj", "down_proj")  # groups, then projections (llmforge/model/adapters.py)


class AdapterSpec(Spec):
    """A low-rank adapter trained in place of the model's weights (llmforge/model/adapters.py)."""
    # lora: fp32/bf16 frozen base; qlora: the frozen base in 4-bit NF4 (CUDA only)
    kind: Literal["lora", "qlora"] = "lora"
    rank: Int = Field(default=16, gt=0)
    alpha: Float = Field(default=32.0, gt=0)  # the update is scaled by alpha / rank
    dropout: Fraction = 0.0  # on the adapter's input
    targets: list[Literal[_TARGETS]] = Field(default=["attn", "mlp"], min_length=1)
    rslora: bool = False  # scale by alpha / sqrt(rank) (Kalajdzievski 2023), steadier at high rank
    # The token embeddings and output head train in full beside the adapter (PEFT's modules_to_save):
    # what tokens the base never saw, such as chat tags new to it, need to be learned at all.
    train_embeddings: bool = False


class _Stage(Spec):
    """The keys every stage has; StageSpec below adds each kind's own (stages/<kind>.py Options)."""
    name: Name
    kind: Literal[tuple(KINDS)]
    # The weights this stage starts from: the previous stage's final weights (default), another
    # earlier stage's (its name), or 'none' for a fresh random init.
    init: Name | None = None
    mix: dict[str, Annotated[Float, Field(gt=0)]] = Field(min_length=1)
    # The budget: exactly one of tokens, steps, epochs (passes over the mixed sources' training data).
    tokens: PositiveCount | None = None
    steps: PositiveCount | None = None
    epochs: Annotated[Float, Field(gt=0)] | None = None
    # The global batch: tokens per optimizer step, or sequences per step (dpo: preference pairs).
    batch_tokens: PositiveCount | None = None
    batch_size: PositiveCount | None = None
    seq_len: Int | None = Field(default=None, gt=1)  # default: model.seq_len
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    # Train a low-rank adapter instead of the weights; 'none': full training even where the
    # recipe's top-level adapter is the default (it applies to every stage but pretrain).
    adapter: Annotated[Annotated[AdapterSpec, Tag("spec")] | Annotated[Literal["none"], Tag("none")],
                       Discriminator(lambda v: "spec" if isinstance(v, (dict, AdapterSpec)) else "none")] | None = None

    @model_validator(mode="after")
    def _one_budget(self):
        if sum(x is not None for x in (self.tokens, self.steps, self.epochs)) != 1:
            raise ValueError("give exactly one budget: tokens, steps or epochs")
        if (self.batch_tokens is None) == (self.batch_size is None):
            raise ValueError("give exactly one batch: batch_tokens or batch_size")
        own = KINDS[self.kind].Options.model_fields
        misplaced = [k for k in OPTION_KINDS if getattr(self, k) is not None and k not in own]
        if misplaced:
            *most, last = OPTION_KINDS[misplaced[0]]
            kinds = f"{', '.join(most)} and {last}" if most else last
            raise ValueError(f"{', '.join(misplaced)} applies to {kinds} stages, not {self.kind}")
        return self

    @property
    def options(self):
        """The kind's own settings, defaults filled in (an instance of its Options)."""
        options = KINDS[self.kind].Options
        return options(**{k: getattr(self, k) for k in options.model_fields if getattr(self, k) is not None})


def _option_fields() -> tuple[dict, dict]:
    """Every kind's own keys as optional stage keys (None: not given, the kind's default holds),
    with the same constraints; and which kinds each key applies to."""
    fields, kinds = {}, {}
    for k in KINDS.values():
        for key, f in k.Options.model_fields.items():
            tp = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
            if key in fields and fields[key][0] != tp | None:
                raise TypeError(f"stage key {key!r} has different types in {kinds[key][0]} and {k.name}")
            fields[key] = (tp | None, None)
            kinds.setdefault(key, []).append(k.name)
    return fields, kinds


_FIELDS, OPTION_KINDS = _option_fields()
StageSpec = create_model("StageSpec", __base__=_Stage, __doc__="One stage: the common keys and its kind's own.",
                         **_FIELDS)


class RuntimeSpec(Spec):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # YAML 1.1 reads a bare on/off as true/false; take either spelling.
    compile: Annotated[Literal["auto", "on", "off"], BeforeValidator(lambda v: {True: "on", False: "off"}.get(v, v)
                                                                     if isinstance(v, bool) else v)] = "auto"
    micro_batch: AutoOrPositive = "auto"  # sequences per forward
    # Keep only each block's input for backward and recompute the block there: every block (full),
    # every other one (selective), none; auto: the plan's choice, on only when it is what lets the
    # micro-batch it wants fit.
    activation_checkpointing: Literal["auto", "none", "selective", "full"] = "auto"
    threads: AutoOrPositive = "auto"  # CPU threads for torch
    log_every: Int = Field(default=10, gt=0)  # steps between progress/metrics lines
    data_workers: AutoOrPositive = "auto"  # processes tokenizing data; auto: one per CPU core
    # With several processes: ddp (each holds the whole model) or fsdp (weights, gradients and
    # optimizer state sharded); auto picks ddp when training fits one device, by the plan's estimate.
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    # A step whose gradients are not finite (inf/nan): stop (exit 2; every checkpoint stays intact),
    # or skip its update (counted in the metrics as `skipped`), stopping after max_nonfinite in a row.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite: Int = Field(default=10, gt=0)
    # Experiment trackers that log what metrics.jsonl logs (llmforge/output/trackers.py): tensorboard
    # (RUN_DIR/tensorboard/), wandb (WANDB_MODE=offline works without a network).
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default=[], max_length=2)


class Recipe(Spec):
    name: Name
    seed: Int = 1337
    tokenizer: TokenizerSpec
    model: ModelSpec
    data: dict[Name, SourceSpec] = Field(min_length=1)
    stages: list[StageSpec] = Field(min_length=1)
    runtime: RuntimeSpec = RuntimeSpec()
    adapter: AdapterSpec | None = None  # the default adapter of every post-training stage
    _base_dir: Path | None = PrivateAttr(default=None)  # the recipe file's folder
    _written: tuple | None = PrivateAttr(default=None)  # (merged data, its files) for plan --show-recipe

    @property
    def base_dir(self) -> Path:
        """Relative data paths are resolved against the recipe file's folder."""
        return self._base_dir or Path.cwd()

    def stage_seq_len(self, stage) -> int:
        return stage.seq_len or self.model.seq_len

    def stage_adapter(self, stage) -> AdapterSpec | None:
        """The stage's adapter: its own, else the recipe's default (post-training stages only:
        those whose data are conversations)."""
        if stage.adapter == "none":
            return None
        return stage.adapter or (self.adapter if KINDS[stage.kind].chat else None)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled, overrides applied) as YAML, for the run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

