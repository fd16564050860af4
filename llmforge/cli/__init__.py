"""The command line: thin commands over the library, one module per group (`train.py`: commands
that read a recipe; `use.py`: commands that use a finished stage; `views.py`: report, compare,
schema), all on the one Typer app of `app.py`, the one place that turns an LlmforgeError into red
lines + a hint and exit code 2. torch is imported only inside commands, so `llmforge --help`
stays instant."""

from . import train, use, views  # noqa: F401  (each registers its commands on app, in this order)
from .app import app, main, user_errors

__all__ = ["app", "main", "user_errors"]
