"""W3C trace-context propagation across nodes.

A local write records the current ``traceparent`` in its CDC entry; the node that applies it
opens a span in that same trace, so one write can be followed through the mesh. Only the
OpenTelemetry API is used: with no SDK installed every call here is a cheap no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from opentelemetry import propagate, trace

from replication_engine.codec import Change

_tracer = trace.get_tracer("replication_engine")


def current_trace_parent() -> str | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def continue_trace(batch: Sequence[Change], name: str = "replication.apply") -> Iterator[None]:
    """One span per traced change, each a child of the write that produced it."""
    with contextlib.ExitStack() as stack:
        for change in batch:
            if not change.trace_parent:
                continue
            parent = propagate.extract({"traceparent": change.trace_parent})
            stack.enter_context(
                _tracer.start_as_current_span(
                    name,
                    context=parent,
                    kind=trace.SpanKind.CONSUMER,
                    attributes={"replication.key": change.key, "replication.origin": change.origin},
                )
            )
        yield
