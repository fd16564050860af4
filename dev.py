#!/usr/bin/env python3
"""Set up a local .venv and run the quickstart or the tests. Needs only Python 3.10+.

    python3 dev.py quickstart   # run recipes/quickstart.yaml, then ask the model two questions
    python3 dev.py test         # the test suite (pytest arguments may follow)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# The CPU build of torch 2.13 (never newer than 2.14.1); pip takes it from a local wheel where one exists.
INSTALL = ["torch==2.13.0", "-e", ".[dev]"]


def setup() -> None:
    """Create .venv and install llmforge into it; redone only when pyproject.toml changes."""
    stamp = VENV / ".installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + " ".join(INSTALL).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == want:
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.create(VENV, with_pip=True)
    print("installing llmforge and its dependencies into .venv ...", flush=True)
    subprocess.run([BIN / "python", "-m", "pip", "install", "-q", *INSTALL], cwd=ROOT, check=True)
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("quickstart", "test"):
        print(__doc__)
        return 2
    setup()
    if argv[0] == "test":
        return subprocess.run([BIN / "python", "-m", "pytest", "-q", *argv[1:]], cwd=ROOT).returncode
    llmforge = BIN / "llmforge"
    code = subprocess.run([llmforge, "run", "recipes/quickstart.yaml"], cwd=ROOT).returncode
    if code:
        return code
    # Two questions about people no training conversation mentioned, through the chat command, each
    # answer beside the truth from the generated world (a newcomer cannot know it; a tiny model is
    # often wrong, and should be seen to be).
    asked = {"Where does Clara live?": ("Clara", "city"), "What pet does Diego have?": ("Diego", "pet")}
    chat = subprocess.run([llmforge, "chat", "runs/quickstart", "--temperature", "0"], input="\n".join(asked) + "\n",
                          stdout=subprocess.PIPE, text=True, cwd=ROOT)
    answers = chat.stdout.strip().splitlines()
    if chat.returncode or len(answers) != len(asked):
        print(chat.stdout, end="")
        return chat.returncode
    truth = subprocess.run([BIN / "python", "-c", "import json; from llmforge.data.world import people; "
                            "print(json.dumps({p['name']: p for p in people()}))"],
                           stdout=subprocess.PIPE, text=True, check=True).stdout
    people = json.loads(truth)
    for (question, (name, attribute)), answer in zip(asked.items(), answers):
        print(f"{question}  {answer}  (true: {people[name][attribute]})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
