"""What each recipe key means, in one place, and the JSON Schema editors read. docs/recipe.md's key
tables are generated from the schema with these words (llmforge/reference.py), and
recipe_json_schema (docs/recipe.schema.json) carries them as each key's description (hover text). A key the schema gains without an entry here fails
tests/test_docs.py, and so does an entry for a key that is gone.

Keys are written as docs/recipe.md's tables name them: `model.rope_scaling.factor`,
`data.<name>.path` (every source), `stages[].beta` (every stage), `stages[].reward[].weight`.
"""

from __future__ import annotations

import json
import re

from .schema import Recipe

MEANINGS = {
    "extends": "base recipe(s) merged under this one; see [Base recipes](#base-recipes-extends)",
    "name": "run name; the default run directory is `runs/<name>`",
    "seed": "seeds model init (per stage: seed + stage index) and the data order",
    "tokenizer": "see below",
    "model": "see below",
    "data": "the data sources stages can mix",
    "stages": "training stages, run in order",
    "runtime": "how to run on this machine (never changes the math)",
    "adapter":
        "a LoRA adapter for every post-training stage (not pretrain) that sets no `adapter` of its own; see "
        "[Adapters](#adapters-lora)",
    "tokenizer.type":
        "`bpe`, `unigram` or `char` (sentencepiece), or `bytelevel_bpe` (Hugging Face `tokenizers`: GPT-2's "
        "byte-level BPE, the kind Llama 3 and Qwen use; saved as `tokenizer.json`)",
    "tokenizer.vocab_size": "size to train; for `char` an upper bound. Give this **or** `path`",
    "tokenizer.path":
        "an existing tokenizer to use instead of training: a sentencepiece `.model` file or a Hugging Face "
        "`tokenizer.json` (BPE or Unigram; its `tokenizer_config.json` beside it is read too)",
    "tokenizer.byte_fallback": "unknown characters become UTF-8 byte tokens, so any text round-trips exactly",
    "tokenizer.train_on": "source names to draw the training sample from",
    "tokenizer.sample_bytes": "how much text to train on (an equal share from each source)",
    "tokenizer.chat_template":
        "`default`, a map of your own four tags (below), `chatml`, `llama3`, or `{path: ...}` a Jinja template "
        "(below). Needed by sft, dpo and reward stages (an error otherwise), conversation data and "
        "`eval.tasks`. With `model.init.hf` and no `chat_template`, the model's own",
    "tokenizer.chat_template.system": "opens a system message",
    "tokenizer.chat_template.user": "opens a user turn",
    "tokenizer.chat_template.assistant": "opens an assistant turn",
    "tokenizer.chat_template.end": "closes every turn; generation stops when the assistant emits it",
    "model.preset":
        "`llama` (rmsnorm, rope, swiglu, no bias, untied) or `gpt2` (layernorm, learned positions, gelu, bias, "
        "tied); `qwen2` (llama with biases on q, k, v), `qwen3` (llama with `qk_norm`), `mistral` and `phi3` "
        "(llama, with `sliding_window` if set). The preset is also the Hugging Face family `export` writes",
    "model.n_layer": "depth: transformer blocks",
    "model.n_head": "attention heads",
    "model.n_embd": "width of the residual stream",
    "model.seq_len": "context length",
    "model.n_kv_head": "key/value heads (grouped-query attention when fewer)",
    "model.norm": "`rmsnorm` or `layernorm`",
    "model.positions": "`rope` or `learned`",
    "model.mlp": "`swiglu` or `gelu`",
    "model.mlp_hidden": "hidden width; swiglu: 8/3 x n_embd rounded up to 64, gelu: 4 x n_embd",
    "model.tie_embeddings": "share the input embedding and output head",
    "model.bias": "biases in linear layers and layernorm",
    "model.dropout": "dropout on attention and residual branches",
    "model.rope_theta": "RoPE base",
    "model.norm_eps": "epsilon of the norms",
    "model.head_dim": "width of each attention head (Qwen3 sets its own: q, k, v are `n_head x head_dim` wide)",
    "model.qkv_bias": "biases on the q, k, v projections only (Qwen2)",
    "model.qk_norm": "RMSNorm over each head's queries and keys before rope (Qwen3)",
    "model.rope_scaling.type":
        "Llama 3.1's long-context rope (rope_type llama3 in a transformers config), e.g. `rope_scaling: {factor: "
        "8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192}`",
    "model.rope_scaling.factor": "how much longer than the original context the model reads",
    "model.rope_scaling.low_freq_factor": "wavelengths above original / low_freq_factor are scaled in full",
    "model.rope_scaling.high_freq_factor":
        "wavelengths below original / high_freq_factor are kept; those between are blended",
    "model.rope_scaling.original_max_position_embeddings": "the context length the model was first trained at",
    "model.sliding_window": "each token attends to at most this many recent tokens, itself included (Mistral, Phi-3)",
    "model.vocab_size": "rows of the embedding and output head; more pads them (generation never picks a padded id)",
    "model.init.hf":
        "a local transformers folder to start from: `config.json` of model_type `llama` (incl. Llama 3 rope "
        "scaling; SmolLM2), `qwen2` (Qwen2.5), `qwen3`, `mistral`, `phi3` or `gpt2`; `model.safetensors` or a "
        "sharded index; `tokenizer.json` (or sentencepiece's `tokenizer.model`)",
    "data.<name>.path":
        "a file, a directory (all files below it) or a glob; relative to the recipe's folder. A folder "
        "`save_to_disk` wrote is read as that dataset ([docs/data.md](data.md))",
    "data.<name>.builtin": "a built-in source (below; no download)",
    "data.<name>.hf":
        "a Hugging Face dataset, `org/name`, loaded through `datasets` and its cache (`pip install "
        "'llmforge[datasets]'`; `HF_HUB_OFFLINE=1` reads the cache only). See [docs/data.md](data.md)",
    "data.<name>.subset": "hf: the dataset's configuration (its subset on the Hub)",
    "data.<name>.revision": "hf: a branch, tag or commit of the dataset",
    "data.<name>.format":
        "`auto` tells it from the first record ([docs/data.md](data.md)); a file that is not records is text. "
        "For pretraining: `text`, `jsonl` (one JSON object per line; `.jsonl.gz` is read gzipped) or `parquet` "
        "(a column of parquet or Arrow files; needs `pip install 'llmforge[parquet]'`); for sft: `chat`, "
        "`sharegpt`, `alpaca` or `prompt_response`; for dpo, simpo, orpo and reward: `preference`; for kto: "
        "`unpaired` or `preference`; for grpo: `prompt` (records: JSON lines, parquet or Arrow, see "
        "[Conversation data](#conversation-data))",
    "data.<name>.split":
        "text: a document per `file` (the default), per `paragraph` (lines between blank or whitespace-only "
        "lines; inner line breaks kept) or per `line` (each non-blank line, without its line break). A dataset "
        "(`hf`, or a saved folder with splits): the split to read (default `train`)",
    "data.<name>.field":
        "jsonl: the field that holds the text (default `text`); parquet: the column (a string column; default "
        "`text`); chat: the field that holds the message list (default `messages`); sharegpt: the field that "
        "holds the turns (default `conversations`). Not for alpaca, prompt_response or preference",
    "data.<name>.role_map":
        "chat, sharegpt: other role or speaker names as `system`, `user`, `assistant` or `tool`, e.g. `{bot: "
        "assistant}` (sharegpt already knows `human`, `gpt`, `system`, `function_call`, `observation` and the usual "
        "variants)",
    "data.<name>.train_on_reasoning":
        "chat, sharegpt: an assistant's reasoning (`reasoning_content`, or `<think>...</think>` in its content) is "
        "learned with its reply; `false` learns the reply and tool calls alone (the `<think>` tags stay learned)",
    "data.<name>.prompt_field": "prompt_response, prompt: the field that holds the user's turn",
    "data.<name>.answer_field": "prompt: the field that holds the reference answer (optional in each record)",
    "data.<name>.response_field": "prompt_response: the field that holds the assistant's turn",
    "data.<name>.min_chars":
        "documents with fewer characters are dropped (and counted); for conversations, the characters of all "
        "turns (a pair: prompt, chosen and rejected)",
    "data.<name>.max_chars": "documents with more characters are dropped (and counted); counted as for `min_chars`",
    "data.<name>.on_error": "`fail`: the first bad record is an error; `skip`: bad records are skipped and counted",
    "data.<name>.val_fraction":
        "the last share of the source's tokens is held out for eval; for conversation formats, the last share "
        "of its *examples* (an example is never cut in two)",
    "data.<name>.max_bytes":
        "text formats: read at most this much text (UTF-8 bytes of kept documents); the document it ends in is "
        "cut there",
    "data.<name>.epochs":
        "at most this many passes over the source's training split (its rows in the stage: windows, packed rows"
        " or pairs)",
    "stages[].name": "unique; the stage's folder is `stages/NN-<name>`",
    "stages[].kind":
        "`pretrain`, `sft`, `dpo`, `kto`, `simpo`, `orpo`, `reward` or `grpo` (see [Stage kinds](#stage-kinds))",
    "stages[].init":
        "the weights the stage starts from: the previous stage's final weights (the first stage: "
        "`model.init.hf`'s weights, else a fresh random init), an earlier stage's (its name), or `none` for a "
        "fresh random init. A stage that trains a language model cannot start from a reward stage",
    "stages[].mix":
        "source name -> weight: each source's share of the stage's rows (pretrain: windows, so tokens; sft: "
        "packed rows; dpo: pairs)",
    "stages[].tokens":
        "the budget in tokens, rounded up to whole steps; give exactly one of `tokens`, `steps`, `epochs`",
    "stages[].steps": "the budget in optimizer steps",
    "stages[].epochs": "the budget in passes over the rows of all mixed sources (steps = ceil(epochs x rows / batch))",
    "stages[].batch_tokens":
        "the global batch per optimizer step in tokens: a multiple of `seq_len` (dpo: of 2 x `seq_len`, a pair "
        "being two sequences); give exactly one of `batch_tokens`, `batch_size`",
    "stages[].batch_size":
        "the global batch per optimizer step in rows (pretrain: windows, sft: rows of `seq_len` inputs, dpo: "
        "preference pairs)",
    "stages[].seq_len": "at most `model.seq_len`",
    "stages[].train_on":
        "sft: the learned tokens: `assistant` (the content of each assistant turn and its end tag) or `all` "
        "(every token after the first)",
    "stages[].packing":
        "sft: several conversations per row, each attending only to itself; `false`: one per row, padded",
    "stages[].overlong":
        "sft, dpo, kto, simpo, orpo, reward: an example longer than `seq_len`+1 tokens is cut to fit "
        "(`truncate`) or left out (`drop`)",
    "stages[].beta":
        "dpo: the strength of the pull toward the reference (> 0; kto likewise); simpo (default `2.0`): the "
        "reward scale; orpo (default `0.1`): the weight of the odds-ratio term (the paper's lambda)",
    "stages[].gamma": "simpo: the target reward margin",
    "stages[].desirable_weight": "kto: the weight of the good replies' loss (the paper's lambda_D)",
    "stages[].undesirable_weight": "kto: the weight of the bad replies' loss (lambda_U)",
    "stages[].label_smoothing":
        "dpo, `loss: sigmoid`: the assumed chance that a label is flipped, in [0, 0.5) (conservative DPO)",
    "stages[].loss": "dpo: `sigmoid` (DPO, Rafailov et al. 2023) or `ipo` (Azar et al. 2023)",
    "stages[].rpo_alpha":
        "dpo: weight of an added loss, the chosen reply's negative log-likelihood per token (RPO, Pang et al. "
        "2024); keeps chosen replies likely while the margin grows, which small models need",
    "stages[].reward":
        "grpo: what a reply is rewarded for, a list of terms (or one) summed with their `weight` (default 1): "
        "`{verifier: exact | contains | regex | format | length | math}`, `{stage: NAME}` (an earlier reward "
        "stage), `{path: DIR}` (another run's reward stage `final/`, trained with this run's tokenizer) or "
        "`{plugin: NAME}` (an installed package's, [docs/rl.md](rl.md)); `length` takes `within` (default "
        "`max_new_tokens` / 2). See [grpo](#grpo)",
    "stages[].reward[].verifier": "a built-in check of the reply against the prompt's reference answer (table above)",
    "stages[].reward[].stage": "an earlier reward stage of this recipe, whose score of prompt + reply is the reward",
    "stages[].reward[].path": "another run's reward stage `final/` folder (refused if trained with another tokenizer)",
    "stages[].reward[].weight": "this term's weight in the sum",
    "stages[].reward[].within": "`length` only: tokens without penalty (default `max_new_tokens` / 2)",
    "stages[].reward[].plugin":
        "a reward an installed package declares under the entry-point group `llmforge.rewards` "
        "([docs/rl.md](rl.md)); the plan names its package and version",
    "stages[].reward[].options": "`plugin` only: its own settings, checked by the plugin's `check` before training",
    "stages[].reward[].timeout": "`plugin` only: seconds one reply's scoring may take; past it the reply fails",
    "stages[].reward[].on_error":
        "`plugin` only: `zero`: a reply it fails on (raises, times out, returns no finite number) scores 0 and is "
        "counted (`reward_errors`, the stage's `reward_errors.jsonl`); `stop`: the run stops with its traceback",
    "stages[].group": "grpo: replies sampled per prompt, at least 2 (advantages are relative to the group)",
    "stages[].max_new_tokens":
        "grpo: the longest reply; prompts that leave less room in `seq_len` are left out (counted as too long)",
    "stages[].temperature": "grpo: sampling temperature (log-probabilities are taken at it too)",
    "stages[].top_k": "grpo: sample among the k likeliest tokens only",
    "stages[].kl": "grpo: weight of the KL penalty to the reference (DeepSeekMath's 0.04; DAPO uses 0)",
    "stages[].clip": "grpo: the ratio's clip range, 1 - clip .. 1 + clip (PPO)",
    "stages[].clip_high": "grpo: the upper clip, 1 + clip_high (DAPO's clip-higher uses 0.28)",
    "stages[].scale_rewards": "grpo: advantages divided by the group's reward std (GRPO); `false`: not (Dr. GRPO)",
    "stages[].loss_mean":
        "grpo: a reply's loss is the mean over its tokens, then replies are averaged (GRPO); `constant`: summed"
        " over tokens / `max_new_tokens` (Dr. GRPO)",
    "stages[].policy_loss":
        "grpo: `grpo` (token ratios, PPO's clip), `gspo` (the reply's sequence ratio, Zheng et al. 2025; clip "
        "~3e-4) or `cispo` (clipped stop-gradient weights on REINFORCE, MiniMax-M1 2025); [docs/rl.md](rl.md)",
    "stages[].updates_per_rollout":
        "grpo: optimizer steps on each batch of replies (TRL's `num_iterations`); pi_old is the policy that "
        "sampled them, taken once",
    "stages[].dynamic_sampling":
        "grpo: DAPO's dynamic sampling: groups whose replies all score alike are replaced by the next prompts' "
        "(counted as `refills`)",
    "stages[].max_rollouts": "grpo, `dynamic_sampling` only: batches of prompts rolled out in one step, at most",
    "stages[].environment.name":
        "grpo, multi-turn: `calculator` (built in) or an environment an installed package declares under the "
        "entry-point group `llmforge.environments`; the policy calls its tools as its chat template writes calls "
        "([docs/rl.md](rl.md))",
    "stages[].environment.max_turns": "the policy's turns per conversation, tool results between them",
    "stages[].environment.weight": "of the environment's own reward (if it gives one), added to `reward`'s terms",
    "stages[].environment.options": "its own settings, checked by its `check` before training",
    "stages[].environment.timeout": "seconds one tool call or its reward may take",
    "stages[].environment.on_error": "its reward failing: `zero` (counted in `reward_errors`) or `stop`",
    "stages[].optimizer.name":
        "`adamw`, or `muon`: Muon (momentum, then the update orthogonalized by Newton-Schulz) for the blocks' "
        "weight matrices and AdamW for embeddings, head, norms and biases; not with `runtime.parallel: fsdp`",
    "stages[].optimizer.lr": "peak learning rate (under `muon`, of the AdamW part)",
    "stages[].optimizer.muon_lr": "`muon` only: peak learning rate of the matrices; the schedule scales both",
    "stages[].optimizer.betas": "AdamW's decay rates of the gradient's mean and square (beta1, beta2)",
    "stages[].optimizer.eps": "AdamW's epsilon, added to the root of the squared-gradient average",
    "stages[].optimizer.weight_decay": "on matrices only (not norms or biases)",
    "stages[].optimizer.grad_clip": "max global gradient norm; `null` turns it off",
    "stages[].schedule.warmup": "steps, or a share of the stage's steps (`'2%'`); linear from 0",
    "stages[].schedule.decay": "`cosine`, `linear` or `constant`, reaching `min_lr` at the last step",
    "stages[].schedule.min_lr": "absolute, or a share of `optimizer.lr`",
    "stages[].eval.every": "steps between held-out evals; 0: only at the start and the end",
    "stages[].eval.tokens":
        "held-out tokens per eval (the same rows every time; sft: rows of `seq_len`, dpo: pairs of 2 x "
        "`seq_len`)",
    "stages[].eval.tasks":
        "task evals run on the stage's final weights, once it is done: `world-qa` (below; needs "
        "`tokenizer.chat_template`), and any lm-evaluation-harness task as `lm-eval:TASK` (`lm-eval:arc_easy`, "
        "`lm-eval:hellaswag`; `pip install 'llmforge[eval]'`, see [docs/evaluation.md](evaluation.md))",
    "stages[].eval.lm_eval.limit": "at most this many documents of each task (a quick look, not a benchmark figure)",
    "stages[].eval.lm_eval.num_fewshot": "examples in each prompt (default: the task's own)",
    "stages[].eval.lm_eval.apply_chat_template":
        "prompt through the stage's chat template, as lm-eval's `--apply_chat_template`",
    "stages[].eval.lm_eval.include_path": "a folder of task YAMLs of your own, relative to the recipe",
    "stages[].checkpoint.every": "steps between checkpoints; 0: only at the end",
    "stages[].checkpoint.keep": "newest checkpoints kept",
    "stages[].adapter":
        "train a LoRA adapter instead of the weights (below), or `none` for full training where the top-level "
        "one would apply",
    "adapter.kind":
        "`lora` (Hu et al. 2021); `qlora` (Dettmers et al. 2023): the targeted layers' frozen weights in 4-bit "
        "NF4 through bitsandbytes (`pip install 'llmforge[qlora]'`), dequantized inside each matmul in bf16; "
        "CUDA only, refused in the plan elsewhere. Written, and tested only on a CUDA machine (`pytest -m "
        "cuda`): no session has had one yet, so it has never run",
    "adapter.rank": "the rank r of each update B A",
    "adapter.alpha": "the update is scaled by alpha / r",
    "adapter.rslora": "scale by alpha / sqrt(r) instead (rank-stabilized LoRA, Kalajdzievski 2023)",
    "adapter.dropout": "dropout on the adapter's input",
    "adapter.train_embeddings":
        "the token embeddings and the output head train in full beside the adapter (PEFT's `modules_to_save`), "
        "and checkpoints hold them too. Tokens the base never saw need it: chat tags new to a pretrained-only "
        "model stay at their random start under plain LoRA (the quickstart's sft then learns no answer format, "
        "see the README)",
    "adapter.targets":
        "groups `attn` (q/k/v/o projections), `mlp` (llama: gate, up, down; gpt2: c_fc, c_proj), `all-linear` "
        "(both; never the output head), or projections by name: `q_proj`, `k_proj`, `v_proj`, `o_proj`, "
        "`w1`/`gate_proj`, `w3`/`up_proj`, `w2`/`down_proj`, `c_fc`, `c_proj`",
    "runtime.device": "`auto` (cuda > mps > cpu), `cpu`, `cuda`, `mps`",
    "runtime.precision": "`auto` (bf16 autocast on GPUs that support it, else fp32), `fp32`, `bf16`",
    "runtime.compile": "`torch.compile` the model: `auto` (on for CUDA), `on`, `off`",
    "runtime.micro_batch": "sequences per forward pass; auto picks the largest divisor of the batch that fits",
    "runtime.activation_checkpointing":
        "keep only each transformer block's input (and its MLP's output) for the backward pass and run the "
        "block's forward again there: `full` (every block: activations shrink to two n_embd vectors per token and "
        "layer, the step does ~1/4 more compute, up to 1/3 for long rows; the plan says how much), `selective` "
        "(every other block: about half of each), `none`, or `auto`: the plan turns it on only when the "
        "micro-batch it wants (up to 16k tokens per forward) does not fit otherwise, and says so. See "
        "[targets.md](targets.md)",
    "runtime.threads": "CPU threads for torch",
    "runtime.log_every":
        "steps between progress lines and `metrics.jsonl` records (`step`, `loss`, `lr`, `tokens_per_s`, `mfu` "
        "on known GPUs, `eta_s`, `first_step_s` once, `time`; eval records: `val_*`)",
    "runtime.data_workers": "processes tokenizing data (auto: one per CPU core)",
    "runtime.parallel":
        "with several processes (`--nproc-per-node`, torchrun): `ddp` (each process holds the whole model), "
        "`fsdp` (FSDP2: weights, gradients and optimizer state sharded per transformer block), or `auto`: ddp "
        "when the plan's memory estimate fits one device, else fsdp. See [distributed.md](distributed.md)",
    "runtime.on_nonfinite":
        "a step whose gradients are not finite (inf or nan, after the ranks' reduction, so all ranks agree): "
        "`stop` ends the run with exit 2 naming stage and step, at the next progress line or checkpoint, before "
        "writing anything (every checkpoint stays intact; the step never waits for the device to decide); `skip` "
        "drops that update and logs `skipped: 1` for the step. AdamW drops it on the device; `muon` under `skip` "
        "reads one flag from the device each step",
    "runtime.max_nonfinite": "with `skip`: this many such steps in a row (in one process) end the run with exit 2",
    "runtime.trackers":
        "also log to `tensorboard` (event files in `RUN_DIR/tensorboard/`: `tensorboard --logdir runs`) and/or "
        "`wandb` (project `$WANDB_PROJECT` or `llmforge`; `WANDB_MODE=offline` needs no network, `wandb sync` "
        "uploads later): the recipe and plan as config/text, every step and eval figure as `stage/key` at the "
        "run's global step, and the results table at each stage's end. After a resume TensorBoard holds each "
        "step once (the killed process's later events are purged); W&B keeps the first values it saw of a step."
        " Only rank 0 logs. A tracker that is not installed (`pip install tensorboard` / `wandb`) or fails is "
        "one warning line; training goes on, and `metrics.jsonl` stays the record. May change between resumes",
}

# Defaults the schema holds as "not given" (null) that mean something: what a reader should see.
DEFAULTS = {
    "tokenizer.vocab_size": "—", "tokenizer.path": "—", "tokenizer.train_on": "all mixed sources",
    "model.n_kv_head": "`n_head`", "model.mlp_hidden": "derived", "model.head_dim": "`n_embd / n_head`",
    "model.norm_eps": "`1e-5`", "model.vocab_size": "the tokenizer's",
    **{f"model.{k}": "the preset's"
       for k in ("norm", "positions", "mlp", "tie_embeddings", "bias", "qkv_bias", "qk_norm")},
    "data.<name>.path": "—", "data.<name>.builtin": "—", "data.<name>.field": "`text` / `messages`",
    "data.<name>.max_bytes": "all", "stages[].init": "the previous stage", "stages[].seq_len": "`model.seq_len`",
    **{f"stages[].{k}": "one required" for k in ("tokens", "steps", "epochs", "batch_tokens", "batch_size")},
    "stages[].adapter": "the top-level `adapter` (post-training stages)", "stages[].clip_high": "`clip`",
    "stages[].reward": "required (grpo)",
    "runtime": "defaults", "tokenizer": "required without `model.init.hf`",
    **{f"model.{k}": "required without `init.hf`" for k in ("n_layer", "n_head", "n_embd", "seq_len")},
}

# The tables of docs/recipe.md: name -> (key prefix, the schema definition it lists).
TABLES = {"top": ("", None), "tokenizer": ("tokenizer.", "TokenizerSpec"),
          "chat_template": ("tokenizer.chat_template.", "ChatTemplateSpec"), "model": ("model.", "ModelSpec"),
          "data": ("data.<name>.", "SourceSpec"), "stages": ("stages[].", "StageSpec"),
          "reward_terms": ("stages[].reward[].", "RewardTerm"), "adapter": ("adapter.", "AdapterSpec"),
          "runtime": ("runtime.", "RuntimeSpec")}


def table_keys(schema: dict) -> dict[str, list[tuple[str, dict, bool | str]]]:
    """Each table's (key, its schema node, required: True, False or when) in the schema's order. A key holding a
    section of its own that no table lists (optimizer, rope_scaling, init) is spelled out as
    dotted keys (optimizer.lr) in its parent's table."""
    defs = dict(schema["$defs"])
    template = schema["$defs"]["TokenizerSpec"]["properties"]["chat_template"]["anyOf"]
    defs["ChatTemplateSpec"] = next(t for t in template if t.get("title") == "ChatTemplateSpec")
    listed = {d for _, d in TABLES.values()}

    def keys(prefix: str, node: dict, spell_out: bool, within: str | None = None):
        for name, prop in node.get("properties", {}).items():
            ref = _only_ref(prop)
            required = name in node.get("required", ())
            if spell_out and ref and ref not in listed:
                yield from keys(f"{prefix}{name}.", defs[ref], True, within if required else prefix + name)
            else:  # a key required inside an optional section is required only when that is given
                yield prefix + name, prop, required and (f"required in `{within.split('.', 1)[1]}`" if within else True)

    return {table: list(keys(prefix, defs[d] if d else schema, d is not None))
            for table, (prefix, d) in TABLES.items()}


def _only_ref(prop: dict) -> str | None:
    alternatives = [a for a in prop.get("anyOf", [prop]) if a.get("type") != "null"]
    if len(alternatives) == 1 and "$ref" in alternatives[0]:
        return alternatives[0]["$ref"].rsplit("/", 1)[-1]
    return None


def describe(schema: dict) -> dict:
    """The schema with each key's meaning as its description (plain) and markdownDescription."""
    for rows in table_keys(schema).values():
        for key, prop, _ in rows:
            if key in MEANINGS:
                prop["markdownDescription"] = MEANINGS[key]
                plain = re.sub(r"\[([^]]+)\]\([^)]*\)", r"\1", MEANINGS[key])  # [text](#link): text
                prop["description"] = plain.replace("`", "").replace("**", "")
    return schema


def recipe_json_schema() -> str:
    """JSON Schema of a recipe, for editors: `# yaml-language-server: $schema=docs/recipe.schema.json`."""
    schema = Recipe.model_json_schema()
    # With model.init.hf the loader takes the architecture and the tokenizer from the folder
    # (recipe/imported.py): an editor must not ask for them then.
    model = schema["$defs"]["ModelSpec"]
    model["if"], model["then"] = {"not": {"required": ["init"]}}, {"required": model.pop("required")}
    schema["required"].remove("tokenizer")
    schema["if"] = {"required": ["model"], "properties": {"model": {"required": ["init"]}}}
    schema["else"] = {"required": ["tokenizer"]}
    # Merged away before validation (recipe/extends.py), so not a field of Recipe; editors still offer it.
    schema["properties"] = {"extends": {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
        "description": "base recipe file(s), relative to this file, merged under this one"}} | schema["properties"]
    return json.dumps(describe(schema), indent=1) + "\n"  # each key's meaning: editors show it on hover
