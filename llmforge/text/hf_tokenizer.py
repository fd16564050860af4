"""A sentencepiece model -> tokenizer.json + tokenizer_config.json, so that transformers'
AutoTokenizer loads the export with the `tokenizers` library alone (no sentencepiece, no
protobuf) and gives llmforge's ids.

sentencepiece's BPE merges, at each step, the adjacent pair whose joined piece is in the vocab
with the highest score; for a BPE model the scores fall with the piece id. `tokenizers`' BPE
merges the pair of lowest rank in a merges list. So the list is every split of every piece into
two pieces, ranked by the joined piece's id. Unigram models keep their scores as they are; a
char model is a BPE with no merges. Text is only " " -> U+2581 (plus the dummy prefix, for
models trained with one), no pre-tokenizer, and characters outside the vocab become byte tokens.
The chat tags and the end-of-text token are added tokens, matched in the text before the model.
"""

from __future__ import annotations

import sentencepiece as spm

from ..errors import CheckpointError
from .tokenizer import META_SPACE, proto_fields

_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE, _WORD, _CHAR = 1, 2, 3, 4


def _specs(model: bytes) -> tuple[int, dict, list[int]]:
    """(model type, normalizer spec fields, piece types) read from the serialized ModelProto
    (field 1: pieces with their type in field 3; 2: trainer spec; 3: normalizer spec)."""
    top = list(proto_fields(model))
    types = [dict(proto_fields(value)).get(3, _NORMAL) for number, value in top if number == 1]
    fields = dict(top)
    trainer, normalizer = dict(proto_fields(fields.get(2, b""))), dict(proto_fields(fields.get(3, b"")))
    return trainer.get(3, _UNIGRAM), normalizer, types


def tokenizer_json(model: bytes) -> tuple[dict, list[str]]:
    """The `tokenizers` pipeline that encodes as this sentencepiece model does, and warnings
    where it may not quite."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    kind, normalizer, types = _specs(model)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    name = normalizer.get(1, b"nmt_nfkc").decode()
    if name != "identity" or normalizer.get(4, 1):  # field 4: remove_extra_whitespaces
        raise CheckpointError(f"tokenizer.model: normalization {name!r} with whitespace squeezing "
                              f"{'on' if normalizer.get(4, 1) else 'off'} has no exact tokenizer.json equivalent",
                              hint="export a model whose tokenizer llmforge trained (identity, no squeezing)")
    if kind == _WORD:
        raise CheckpointError("tokenizer.model: word-level sentencepiece models are not supported for export")
    byte_fallback = _BYTE in types
    unk = types.index(_UNKNOWN) if _UNKNOWN in types else None
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (p, t) in enumerate(zip(pieces, types)) if t in (_CONTROL, _USER, _UNKNOWN)]
    steps = [{"type": "Replace", "pattern": {"String": " "}, "content": META_SPACE}]
    decoders = [{"type": "Replace", "pattern": {"String": META_SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if normalizer.get(3, 1):  # add_dummy_prefix: sentencepiece prepends a space to the text
        steps.insert(0, {"type": "Prepend", "prepend": META_SPACE})
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    warnings = []
    if kind == _UNIGRAM:
        # Measured: segmentations of equal score (runs of whitespace) come out in another order,
        # as the two sum the scores with different rounding; and literal "<0xNN>" text can match
        # a byte piece, which sentencepiece keeps out of its lattice.
        warnings.append("tokenizer.json of a unigram tokenizer can split some text differently from "
                        "llmforge (equal-score segmentations); bpe and char tokenizers give the same ids")
        body = {"type": "Unigram", "unk_id": unk, "byte_fallback": byte_fallback,
                "vocab": [[p, sp.get_score(i)] for i, p in enumerate(pieces)]}
    else:
        body = {"type": "BPE", "dropout": None, "unk_token": pieces[unk] if unk is not None else None,
                "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                "byte_fallback": byte_fallback, "ignore_merges": False,
                "vocab": {p: i for i, p in enumerate(pieces)},
                "merges": _merges(pieces, types) if kind == _BPE else []}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None,
            "post_processor": None, "decoder": {"type": "Sequence", "decoders": decoders}, "model": body}, warnings


def _merges(pieces: list[str], types: list[int]) -> list[list[str]]:
    """Every (left, right) of ordinary pieces that joins into an ordinary piece, ranked by the
    joined piece's id (its merge order in training); splits of one piece left to right."""
    ordinary = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == _NORMAL}
    out = []
    for piece in sorted(ordinary, key=ordinary.__getitem__):
        out += [[piece[:k], piece[k:]] for k in range(1, len(piece))
                if piece[:k] in ordinary and piece[k:] in ordinary]
    return out


def tokenizer_config(model: bytes, seq_len: int, chat_template: str | None) -> dict:
    """What AutoTokenizer needs besides tokenizer.json: the generic fast class (a Llama class
    would rebuild its own pipeline, add a BOS and a dummy prefix), the special tokens, no BOS or
    EOS added to encoded text, and the chat template."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    _, _, types = _specs(model)
    eot = "<|endoftext|>" if sp.piece_to_id("<|endoftext|>") != sp.unk_id() else sp.id_to_piece(sp.eos_id())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
              "eos_token": eot, "pad_token": eot, "bos_token": None,
              "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
              "additional_special_tokens": [sp.id_to_piece(i) for i, t in enumerate(types) if t == _USER],
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if chat_template:
        config["chat_template"] = chat_template
    return config
