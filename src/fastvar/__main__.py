"""``python -m fastvar ...``: the same entry point as the ``fastvar`` command (same flags, output, exit codes).

Why: it works where the console script is not on PATH (a venv that is not activated, a source checkout).
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
