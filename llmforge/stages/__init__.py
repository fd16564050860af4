"""One small module per stage kind; the kind picks the objective. The engine is shared."""

from . import dpo, pretrain, sft

OBJECTIVES = {"pretrain": pretrain.Objective, "sft": sft.Objective, "dpo": dpo.Objective}

__all__ = ["OBJECTIVES"]
