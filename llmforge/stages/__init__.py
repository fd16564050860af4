"""The stage kinds, by name. A kind is one module here; everything else looks it up in KINDS
and never names one: adding a kind is a module and a line below."""

from . import dpo, grpo, kto, orpo, pretrain, reward, sft, simpo
from .kind import Kind

KINDS: dict[str, Kind] = {k.name: k for k in (pretrain.KIND, sft.KIND, dpo.KIND, kto.KIND, simpo.KIND, orpo.KIND,
                                                  reward.KIND, grpo.KIND)}

__all__ = ["KINDS", "Kind"]
