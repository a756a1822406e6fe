"""What the test suite and the benchmarks share, kept out of the wheel and the image.

``proxy`` injects network faults between an engine and a Redis; ``chaos`` runs seeded chaos
against a mesh of real nodes and judges the end state. Tests import it because pytest puts the
repository root on ``sys.path`` (``pythonpath`` in pyproject.toml); ``python -m bench.<name>``
from the root finds it the same way. Starting a ``redis-server`` stays in
``replication_engine.testing``, which the ``demo`` command needs.
"""
