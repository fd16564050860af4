"""Errors a user can cause. The CLI turns each into red line(s) + a hint and exit code 2.

Anything that is not an LlmforgeError is a bug and may show a traceback.
"""

from __future__ import annotations


class LlmforgeError(Exception):
    """A problem the user can fix: bad recipe, missing file, bad data, incompatible checkpoint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    @property
    def lines(self) -> list[str]:
        """One line per problem (a recipe or a plan may have several, one per line)."""
        return self.message.splitlines() or [self.message]


class RecipeError(LlmforgeError):
    """One or more problems in a recipe, each already formatted with its key path and file:line."""

    def __init__(self, problems: list[str], hint: str | None = None):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems), hint)

    @property
    def lines(self) -> list[str]:
        return self.problems


class TokenizerError(LlmforgeError):
    pass


class DataError(LlmforgeError):
    pass


class PlanError(LlmforgeError):
    pass


class CheckpointError(LlmforgeError):
    pass


class TrainingError(LlmforgeError):
    """Training cannot go on as asked (gradients that are not finite)."""


class Interrupted(Exception):
    """Raised by the engine after a signal, once a checkpoint is safely on disk."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.message = message


class PeerFailed(Exception):
    """Another process of a distributed run failed and reports it; this one stops quietly."""
