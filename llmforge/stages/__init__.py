"""One small module per stage kind; the kind picks the objective. The engine is shared."""

from . import pretrain

OBJECTIVES = {"pretrain": pretrain}

__all__ = ["OBJECTIVES"]
