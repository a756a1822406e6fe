"""What the test suite and the benchmarks share, kept out of the wheel and the image.

``mesh`` runs a mesh of real nodes and says what they must converge to; ``proxy`` injects
network faults between an engine and a Redis; ``chaos`` puts a proxy on every link of a mesh
and adds the fault operations and a seeded workload; ``judge`` checks a mesh's end state
against the writes made; ``faults`` draws a seeded fault schedule and runs it (``run_chaos``).

Tests import it because pytest puts the repository root on ``sys.path`` (``pythonpath`` in
pyproject.toml); ``python -m bench.<name>`` from the root finds it the same way. Starting a
``redis-server`` stays in ``replication_engine.testing``, which the ``demo`` command needs.
"""
