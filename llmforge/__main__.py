import os
import sys

# Run as a script (torchrun's workers are started as `python .../llmforge/__main__.py`, so they
# import the same llmforge as the launcher, never a `llmforge/` folder in the working
# directory): Python put this folder first on sys.path, where our modules would pass for
# top-level ones. Import the package as installed instead.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

from llmforge.cli import main  # noqa: E402  (absolute: run as a script, there is no package)

if __name__ == "__main__":  # worker processes started with "spawn" import this module too
    main()
