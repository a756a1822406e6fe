"""A peer that is not Redis: replies that declare absurd sizes or come in the wrong shape.

A fake RESP server (:class:`FakePeer`) answers the handshake as Redis would, then whatever the
test says. Such a peer is that peer's failure, counted against its breaker and logged as a
malformed reply, and it never stalls this process: the event loop keeps its beat (a
heartbeat task measures its longest gap) while the bad reply is refused. Honest replies that
merely carry such bytes in a value are read as they are, through the same paths, from real
servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import hiredis
import pybreaker
import pytest
from redis.exceptions import InvalidResponse

from harness.mesh import WriteLog, expected_snapshot, open_mesh, snapshot
from replication_engine import codec
from replication_engine.codec import STREAM_START
from replication_engine.connection import Failure, failure, make_client
from replication_engine.cursor import CursorStore
from replication_engine.hot_path import Tailer, TailerSettings
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer, PeerUnavailable
from replication_engine.store.layout import Keyspace
from replication_engine.testing import RedisFactory, async_wait_until
from replication_engine.wire import MAX_REPLY_DEPTH, MAX_REPLY_ELEMENTS, Wire

PREFIX = "app:"
# Longest a refused reply may take to fail its call: well below the call's own timeout
# (OP_TIMEOUT_S), which is what a reader that waits for two billion elements would take.
# Generous, for a loaded CI machine: what is checked is "at once", not how fast.
PROMPT_S = 3.0
OP_TIMEOUT_S = 5.0
# The heartbeat's beat, and the longest gap it may see: one ``*2000000000`` read without
# bounds stalled the loop for 3.6 s on this machine as its list was freed; the nested case
# within bounds, 0.2 s. Generous for the same reason.
BEAT_S = 0.01
LONGEST_GAP_S = 2.0
# An aggregate header no honest reply of ours comes near, of each kind (array, set, push, map).
ABSURD_HEADERS = [b"*2000000000\r\n", b"~2000000000\r\n", b">2000000000\r\n", b"%2000000000\r\n"]
# What a value may hold: bytes that look like absurd headers once out of their bulk string.
HEADER_LOOKALIKES = b"a\r\n*99999999\r\n~99999999\r\n%99999999\r\n>99999999\r\n*2000000000\r\nz"

Answer = bytes | Callable[[list[bytes]], bytes]
# Enough of Redis for redis-py to connect (RESP3, as it asks for by default).
HANDSHAKE: dict[str, Answer] = {
    "HELLO": b"%1\r\n$5\r\nproto\r\n:3\r\n",
    "CLIENT": b"+OK\r\n",
    "PING": b"+PONG\r\n",
}


class FakePeer:
    """A RESP server on a free port: each command is answered by its name in ``answers``
    (bytes, or a function of the command), else with an error."""

    def __init__(self, answers: Mapping[str, Answer]) -> None:
        self.answers = {**HANDSHAKE, **answers}
        self.commands: list[list[bytes]] = []
        self.hung_up = 0  # connections the client closed
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakePeer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _answer(self, command: list[bytes]) -> bytes:
        answer = self.answers.get(command[0].decode().upper())
        if answer is None:
            return b"-ERR unknown command\r\n"
        return answer(command) if callable(answer) else answer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                requests.feed(data)
                while (command := requests.gets()) is not False:
                    self.commands.append(command)
                    writer.write(self._answer(command))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.hung_up += 1
            writer.close()

    def count(self, name: str) -> int:
        return sum(1 for c in self.commands if c[0].decode().upper() == name)


@contextlib.asynccontextmanager
async def heartbeat() -> AsyncIterator[Callable[[], float]]:
    """A task beating every BEAT_S for the block's duration; yields the longest gap so far."""
    loop = asyncio.get_running_loop()
    longest = 0.0

    async def beat() -> None:
        nonlocal longest
        last = loop.time()
        while True:
            await asyncio.sleep(BEAT_S)  # sync-ok: the beat being measured
            now = loop.time()
            longest = max(longest, now - last)
            last = now

    task = asyncio.create_task(beat(), name="heartbeat")
    try:
        await asyncio.sleep(0)  # sync-ok: lets the beat start before the block runs
        yield lambda: longest
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _peer(url: str) -> Peer:
    return Peer(
        "node-f",
        url,
        prefix=PREFIX,
        metrics=Metrics(),
        failure_threshold=5,
        op_timeout_sec=OP_TIMEOUT_S,
    )


def _batch_answers(xrange: bytes) -> dict[str, Answer]:
    """A tailer's read (layout, record, entries, stream facts) with ``xrange`` as its entries."""
    return {"HGET": b"_\r\n", "HGETALL": b"%0\r\n", "XRANGE": xrange, "XINFO": b"%0\r\n"}


# ------------------------------------------------------------------------------ absurd sizes


@pytest.mark.parametrize("header", ABSURD_HEADERS)
async def test_an_absurd_aggregate_header_fails_the_wire_call_at_once_and_the_loop_runs_on(
    header: bytes,
) -> None:
    async with FakePeer({"XRANGE": header}) as fake, heartbeat() as longest_gap:
        client = make_client(fake.url, socket_timeout=OP_TIMEOUT_S)
        wire = Wire(client, timeout=OP_TIMEOUT_S)
        try:
            started = time.perf_counter()
            with pytest.raises(InvalidResponse, match="Multi-bulk length out of range"):
                await wire.execute([("XRANGE", "s", "-", "+")])
            assert time.perf_counter() - started < PROMPT_S
            await async_wait_until(
                lambda: fake.hung_up == 1, timeout=PROMPT_S, message="the connection dropped"
            )
            assert longest_gap() < LONGEST_GAP_S
        finally:
            wire.close()
            await client.aclose()


@pytest.mark.parametrize("header", ABSURD_HEADERS)
async def test_an_absurd_aggregate_header_fails_a_redis_py_call_at_once(header: bytes) -> None:
    """The peer's other client (cold path, stream facts) reads through redis-py's hiredis
    parser, bounded the same way."""
    async with FakePeer({"HGETALL": header}) as fake, heartbeat() as longest_gap:
        client = make_client(fake.url, socket_timeout=OP_TIMEOUT_S)
        try:
            started = time.perf_counter()
            with pytest.raises(InvalidResponse, match="Multi-bulk length out of range") as info:
                await client.hgetall("h")
            assert time.perf_counter() - started < PROMPT_S
            assert failure(info.value) is Failure.MALFORMED
            assert longest_gap() < LONGEST_GAP_S
        finally:
            await client.aclose()


async def test_aggregates_nested_past_the_bound_are_refused_as_well() -> None:
    """Each level within the elements bound, but as many levels as hiredis allows (1024)
    would declare ten billion elements in all."""
    nested = b"*%d\r\n" % MAX_REPLY_ELEMENTS * (MAX_REPLY_DEPTH + 1)
    async with FakePeer({"GET": nested}) as fake, heartbeat() as longest_gap:
        client = make_client(fake.url, socket_timeout=OP_TIMEOUT_S)
        try:
            with pytest.raises(InvalidResponse, match="nesting depth"):
                await client.get("k")
            assert longest_gap() < LONGEST_GAP_S
        finally:
            await client.aclose()


async def test_a_peer_declaring_an_absurd_batch_fails_the_read_as_its_malformed_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The audit's case: every read of the tailer's answered with ``*2000000000``. Each fails
    at once as the peer's failure (its breaker counts it, the connection is dropped), and the
    event loop keeps its beat through all of them."""
    caplog.set_level(logging.WARNING, logger="replication_engine.peer")
    async with FakePeer(_batch_answers(b"*2000000000\r\n")) as fake, heartbeat() as longest_gap:
        peer = _peer(fake.url)
        try:
            for attempt in range(1, 4):
                started = time.perf_counter()
                with pytest.raises(PeerUnavailable) as info:
                    await peer.read_batch(STREAM_START, 100, block_ms=None)
                assert time.perf_counter() - started < PROMPT_S
                assert "peer node-f: xrange failed: malformed reply" in str(info.value)
                assert "Multi-bulk length out of range" in str(info.value)
                assert peer.breaker.fail_counter == attempt
            assert fake.count("XRANGE") == 3
            await async_wait_until(
                lambda: fake.hung_up == 3, timeout=PROMPT_S, message="each connection dropped"
            )
            assert longest_gap() < LONGEST_GAP_S
            (logged,) = [r for r in caplog.records if r.getMessage() == "peer.call_failed"]
            assert "malformed reply" in logged.error  # type: ignore[attr-defined]
            assert logged.exc_info is None
        finally:
            await peer.close()


async def test_a_peer_declaring_absurd_stream_facts_fails_that_read_alone() -> None:
    """The same through redis-py (``XINFO STREAM`` outside a tailer's batch)."""
    async with FakePeer({"XINFO": b"*2000000000\r\n"}) as fake, heartbeat() as longest_gap:
        peer = _peer(fake.url)
        try:
            with pytest.raises(PeerUnavailable, match="xinfo failed: malformed reply"):
                await peer.stream_info()
            assert peer.breaker.fail_counter == 1
            assert longest_gap() < LONGEST_GAP_S
        finally:
            await peer.close()


async def test_entries_whose_bytes_look_like_absurd_headers_are_read_intact(
    redis_factory: RedisFactory,
) -> None:
    """Through both of a peer's paths (its tailer's wire and redis-py), from a real Redis: a
    value may hold any bytes, and is read back as it was written."""
    server = redis_factory()
    keys = Keyspace(PREFIX)
    direct = make_client(server.url)
    peer = _peer(server.url)
    try:
        fields = {b"op": b"PUT", b"key": HEADER_LOOKALIKES, b"data": HEADER_LOOKALIKES * 3}
        entry_id = await direct.xadd(keys.cdc, fields)  # type: ignore[arg-type]
        await direct.hset("h", mapping={HEADER_LOOKALIKES: HEADER_LOOKALIKES})
        _record, info, entries = await peer.read_batch(STREAM_START, 10, block_ms=None)
        assert entries == [(entry_id, fields)]
        assert info.length == 1
        assert await peer.query.hgetall("h") == {HEADER_LOOKALIKES: HEADER_LOOKALIKES}
        assert await peer.query.xrange(keys.cdc) == [(entry_id, fields)]
    finally:
        await peer.close()
        await direct.aclose()


async def test_a_key_and_value_that_look_like_absurd_headers_replicate(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    value = HEADER_LOOKALIKES  # shorter than codec.COMPRESS_MIN_BYTES: on the wire as it is
    assert len(value) < codec.COMPRESS_MIN_BYTES
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        await log.put(b, HEADER_LOOKALIKES.decode(), value)
        await log.put(b, "plain", value)
        await mesh.wait_converged()
        assert await snapshot(a.store) == expected_snapshot(log.writes)


# ---------------------------------------------------------------------------- wrong shapes


async def test_stream_facts_without_their_last_entry_are_the_peers_malformed_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """redis-py's parse_xinfo_stream raises KeyError('last-entry'): raised as it makes the
    peer's reply into values, so the peer's failure, not the engine's crash."""
    caplog.set_level(logging.WARNING, logger="replication_engine.peer")
    no_last_entry = b"%2\r\n$6\r\nlength\r\n:0\r\n$11\r\nfirst-entry\r\n_\r\n"
    async with FakePeer({"XINFO": no_last_entry}) as fake:
        peer = _peer(fake.url)
        try:
            for _ in range(2):
                with pytest.raises(PeerUnavailable) as info:
                    await peer.stream_info()
                assert "xinfo failed: malformed reply: KeyError: 'last-entry'" in str(info.value)
            assert peer.breaker.fail_counter == 2
            # Said once, without a traceback, while it stays the same.
            (logged,) = [r for r in caplog.records if r.getMessage() == "peer.call_failed"]
            assert logged.exc_info is None
            assert logged.peer == "node-f"  # type: ignore[attr-defined]
        finally:
            await peer.close()


async def test_an_integer_that_is_not_one_is_the_peers_malformed_reply() -> None:
    async with FakePeer(_batch_answers(b":abc\r\n")) as fake:
        peer = _peer(fake.url)
        try:
            with pytest.raises(PeerUnavailable, match="malformed reply: InvalidResponse"):
                await peer.read_batch(STREAM_START, 100, block_ms=None)
            assert peer.breaker.fail_counter == 1
        finally:
            await peer.close()


async def test_entries_of_the_wrong_shape_are_the_peers_malformed_reply() -> None:
    """Shapes our own code makes into values (``peer._entries``): fields of an odd count."""
    odd_fields = b"*1\r\n*2\r\n$3\r\n1-0\r\n*1\r\n$2\r\nop\r\n"
    async with FakePeer(_batch_answers(odd_fields)) as fake:
        peer = _peer(fake.url)
        try:
            with pytest.raises(PeerUnavailable, match=r"malformed reply: .*ValueError"):
                await peer.read_batch(STREAM_START, 100, block_ms=None)
            assert peer.breaker.fail_counter == 1
        finally:
            await peer.close()


async def test_a_root_that_is_not_hex_fails_the_facts_read_instead_of_leaving_it_waiting() -> None:
    answers: dict[str, Answer] = {
        "HGET": b"_\r\n",
        "HGETALL": b"%0\r\n",
        "XINFO": b"-ERR no such key\r\n",
        "GET": b"$2\r\nzz\r\n",
    }
    async with FakePeer(answers) as fake:
        peer = _peer(fake.url)
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                with pytest.raises(PeerUnavailable, match="snapshot_facts failed: malformed"):
                    await peer.snapshot_facts()
            assert peer.breaker.fail_counter == 1
        finally:
            await peer.close()


# ------------------------------------------------------------------------- stream ids (L2)


async def test_an_entry_whose_id_cannot_be_parsed_is_quarantined_and_counted(
    tmp_path: Path,
) -> None:
    """Redis never sends one; a server posing as a peer may. It is kept under the last good
    position (the cursor does not move for it) and counted, like any rejected entry."""
    cursors = await CursorStore.open(tmp_path / "cursors.db")
    metrics = Metrics()
    requested: list[tuple[str, list[str], str]] = []
    tailer = Tailer(
        cast(Any, SimpleNamespace(node_id="b")),
        cast(Any, None),  # _decode touches no store
        cursors,
        local_node_id="a",
        settings=TailerSettings(
            batch_size=100,
            min_batch_size=10,
            max_batch_size=1000,
            adaptive=False,
            block_timeout_sec=1.0,
            flush_slo_sec=1.0,
            read_slo_sec=1.0,
            rate_limit_per_sec=None,
            rate_limit_burst=1,
            shutdown_timeout_sec=1.0,
            relay=False,
            min_read_interval_sec=0.0,
            max_batch_bytes=1 << 20,
            max_clock_offset_ms=300_000,
        ),
        metrics=metrics,
        local_breaker=pybreaker.CircuitBreaker(),
        on_quarantine=lambda peer_id, keys, reason: requested.append((peer_id, keys, reason)),
    )
    try:
        good = [
            codec.encode_entry(codec.Change.put(k, b"v", hlc=1 << 20, origin="b"))
            for k in ("first", "last")
        ]
        fields = {name.encode(): data for name, data in good[0].items()}
        bad = {b"op": b"PUT", b"key": b"odd"}
        last = {name.encode(): data for name, data in good[1].items()}
        changes, last_id, set_aside = await tailer._decode(
            [(b"5-0", fields), (b"not-an-id", bad), (b"7-0", last)], STREAM_START
        )
        assert [c.key for c in changes] == ["first", "last"]
        assert str(last_id) == "7-0" and set_aside
        assert tailer.stats.quarantined == 1
        counted = metrics.registry.get_sample_value(
            "replication_cdc_events_quarantined_total", {"peer": "b", "reason": "bad_stream_id"}
        )
        assert counted == 1
        (row,) = await cursors.quarantine_list(peer_id="b")
        assert (row.stream_id, row.key) == ("5-0", "odd")
        assert row.reason.startswith("bad_stream_id") and "not-an-id" in row.reason
        assert requested == [("b", ["odd"], "quarantine")]
    finally:
        await cursors.close()
