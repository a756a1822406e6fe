"""Which position ``status --mesh`` measures a peer's lag from (tools._Applied)."""

from __future__ import annotations

from replication_engine.codec import StreamId
from replication_engine.knowledge import Anchor, NodeRecord, sid_key
from replication_engine.tools import _Applied

PEER = NodeRecord(node_id="b", incarnation="i1", epoch="e1", relay=False)


def test_the_anchor_in_the_peers_current_stream_wins_over_the_saved_cursor() -> None:
    applied = _Applied(Anchor(PEER.token, sid_key(900, 3), anchored=True), saved="100-0")
    assert applied.position(PEER) == StreamId(900, 3)


def test_an_anchor_in_a_stream_the_peer_no_longer_has_falls_back_to_the_cursor() -> None:
    # The peer's store was replaced (a new incarnation): the old anchor's ids mean nothing.
    old = Anchor("i0.e1.0", sid_key(900, 3), anchored=True)
    assert _Applied(old, saved="100-0").position(PEER) == StreamId(100, 0)
    # Nor is the anchor trusted when the peer's record cannot be read.
    assert _Applied(old, saved="100-0").position(None) == StreamId(100, 0)


def test_a_peer_never_read_has_no_position() -> None:
    assert _Applied(None, saved=None).position(PEER) is None
