"""``python -m replication_engine``: the same command as the ``replication-engine`` script.

It works where the console script is not on PATH (a venv not activated, ``pip --user``).
"""

from __future__ import annotations

import sys

from replication_engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
