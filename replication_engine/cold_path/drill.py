"""The drill's reads: compare a peer's tree with ours where :class:`merkle.DrillPlan` says.

The plan decides which nodes to read next and what each comparison found; this module only
reads, on both sides, with up to ``drill_concurrency`` chunks in flight, and hands the keys
found on. A node the plan marks empty here (missing from our parent) is read on the peer only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from replication_engine.cold_path.local import LocalStore
from replication_engine.cold_path.stats import PeerRepair
from replication_engine.merkle import Branch, DrillPlan
from replication_engine.peer import Peer

# Tree nodes read per pipelined round trip: every child of one node at the default fanout. A
# reply is at most 256 full children maps (about 2 MB); leaf buckets are far smaller.
NODE_CHUNK_PATHS = 256


@dataclass(frozen=True, slots=True)
class _Compared:
    """Maps of one chunk of tree nodes, read on both sides ({} where empty here)."""

    chunk: list[Branch]
    local: Sequence[Mapping[str, str]]
    remote: Sequence[Mapping[str, str]]


async def drill(
    peer: Peer,
    local: LocalStore,
    starts: Sequence[str],
    repair: PeerRepair,
    *,
    limit: int | None,
    concurrency: int,
    on_keys: Callable[[list[str]], Awaitable[None]],
    absent: list[str] | None = None,
    absent_max: int = 0,
) -> None:
    """Walk the branches under ``starts`` that differ, handing differing leaf keys on.

    The keys of a differing leaf bucket that the peer holds with another digest go to
    ``on_keys`` (to fetch); those only this store holds are appended to ``absent``, when
    given, up to ``absent_max`` of them (absence by knowledge decides on them).

    Deeper levels are read first, so leaf keys (and their fetches) start flowing early and
    the queue of pending paths stays small. Stops once ``limit`` keys are found, setting
    ``repair.remaining`` when anything was left unvisited.
    """
    plan = DrillPlan(local.geometry, starts, chunk_paths=NODE_CHUNK_PATHS, limit=limit)
    outstanding: set[asyncio.Task[_Compared]] = set()
    try:
        while True:
            while len(outstanding) < concurrency and (chunk := plan.next_chunk()) is not None:
                outstanding.add(
                    asyncio.create_task(
                        _compare(peer, local, chunk), name=f"cold_path.drill[{peer.node_id}]"
                    )
                )
            if not outstanding or plan.is_limit_reached:
                break
            done, _ = await asyncio.wait(outstanding, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                outstanding.discard(task)
                compared = task.result()
                step = plan.compared(compared.chunk, compared.local, compared.remote)
                repair.branches_visited += len(compared.chunk)
                if absent is not None:
                    absent.extend(step.only_here[: max(0, absent_max - len(absent))])
                if step.cut:
                    repair.remaining = True
                if step.fetch:
                    await on_keys(step.fetch)
        if plan.is_unfinished:
            repair.remaining = True
    finally:
        for task in outstanding:
            task.cancel()
        if outstanding:
            await asyncio.gather(*outstanding, return_exceptions=True)


async def _compare(peer: Peer, local: LocalStore, chunk: list[Branch]) -> _Compared:
    paths = [branch.path for branch in chunk]
    remote = await peer.call(lambda: peer.reader.nodes(paths), what="merkle_nodes")
    wanted = [branch.path for branch in chunk if not branch.empty_here]
    read = iter(await local.call("read tree nodes", local.store.reader.nodes(wanted)))
    here = [{} if branch.empty_here else next(read) for branch in chunk]
    return _Compared(chunk, here, remote)
