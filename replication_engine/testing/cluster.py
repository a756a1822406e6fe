"""A real Redis Cluster made of ``redis-server`` processes, for tests, benchmarks and the demo.

``redis-server --cluster-enabled yes`` on free ports, joined by ``redis-cli --cluster create``,
waited for until every node reports ``cluster_state:ok`` and every replica has synced. Servers
come from the caller's factory (a test's ``redis_factory``), which kills them at its end
whatever happens.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replication_engine.testing import RedisFactory, RedisHandle, find_redis_server, wait_until

CLUSTER_READY_TIMEOUT_S = 20.0


def redis_cli_binary() -> str | None:
    """``redis-cli`` beside the ``redis-server`` in use, else on ``PATH``, else None."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    return shutil.which("redis-cli")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (10,000 above it, at most 65,535) is free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 55_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node in 20000..65000")


@dataclass
class Cluster:
    masters: list[RedisHandle]
    replicas: list[RedisHandle]

    @property
    def seed(self) -> RedisHandle:
        return self.masters[0]


def start_cluster(
    redis_factory: RedisFactory, *, masters: int = 3, replicas: int = 0, **server_options: Any
) -> Cluster:
    """Start and join ``masters * (1 + replicas)`` nodes; returns once the cluster is ok.

    ``server_options`` go to every server (``appendonly=True`` keeps a node's data across a
    restart, as a shard that goes down and comes back needs)."""
    cli = redis_cli_binary()
    if cli is None:
        raise RuntimeError("no redis-cli binary: it is needed to create a cluster")
    nodes = [
        redis_factory(
            port=cluster_port(),
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ],
            **server_options,
        )
        for _ in range(masters * (1 + replicas))
    ]
    addresses = [f"{n.host}:{n.port}" for n in nodes]
    subprocess.run(
        [
            cli,
            "--cluster",
            "create",
            *addresses,
            "--cluster-replicas",
            f"{replicas}",
            "--cluster-yes",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )

    def ready() -> bool:
        """Every node sees the cluster ok, and every replica has synced with its master (the
        cluster is ok before the replicas have even taken their role)."""
        for node in nodes:
            with node.client() as client:
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
        for node in nodes[masters:]:
            with node.client() as client:
                info = client.info("replication")
                if info.get("role") != "slave" or info.get("master_link_status") != "up":
                    return False
        return True

    wait_until(ready, timeout=CLUSTER_READY_TIMEOUT_S, message="cluster_state:ok on every node")
    return Cluster(nodes[:masters], nodes[masters:])


def node_id_of(node: RedisHandle) -> str:
    with node.client() as client:
        return str(client.execute_command("CLUSTER", "MYID").decode())


def migrate_slot(cluster: Cluster, slot: int, source: RedisHandle, target: RedisHandle) -> int:
    """Move one slot from ``source`` to ``target`` as ``redis-cli --cluster reshard`` does, key
    batch by key batch (clients meet ASK and TRYAGAIN meanwhile); returns the keys moved.

    The keys move in name order, as Redis 6.2 lists them (``CLUSTER GETKEYSINSLOT``); Redis 7.0
    lists the newest first, which happens to move a partition's meta and record after the rest,
    and later servers list them in no set order. Name order moves the meta before the tree, so
    a call that a partial partition let run on the wrong master would show here."""
    source_id, target_id = node_id_of(source), node_id_of(target)
    with target.client() as to, source.client() as frm:
        to.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        frm.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while True:
            keys = sorted(frm.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1_000_000))[:100]
            if not keys:
                break
            frm.execute_command("MIGRATE", target.host, target.port, "", 0, 10_000, "KEYS", *keys)
            moved += len(keys)
        for node in cluster.masters:
            if node.is_running():
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    return moved


def slot_owner(cluster: Cluster, slot: int) -> RedisHandle:
    """The master that serves ``slot`` now, as the cluster itself says (a live node is asked)."""
    nodes = cluster.masters + cluster.replicas
    live = [n for n in nodes if n.is_running()]
    with live[0].client() as client:
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return next(n for n in nodes if n.port == int(master[1]))
    raise LookupError(f"no master serves slot {slot}")


def replicas_of(cluster: Cluster, master: RedisHandle) -> list[RedisHandle]:
    """The nodes replicating ``master`` now, as its ``INFO replication`` lists them."""
    with master.client() as client:
        info = client.info("replication")
    ports = {
        int(v["port"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
    }
    return [n for n in cluster.masters + cluster.replicas if n.port in ports]


class PartitionServer:
    """A cluster seen as the one server that holds a partition, for harnesses whose faults act
    on "a node's Redis": kill, pause and restart reach whichever master serves ``slot`` now, so
    a kill is a failover (the cluster promotes the replica) and a restart brings the old master
    back, as a replica.

    ``url`` is a master of another shard, which no fault here touches: a client seeded by it can
    always find the cluster. There is no data directory: restoring or wiping "the" Redis means
    nothing for a cluster.
    """

    def __init__(self, cluster: Cluster, slot: int) -> None:
        self.cluster = cluster
        self.slot = slot
        holder = slot_owner(cluster, slot)
        self._seed = next(m for m in cluster.masters if m.port != holder.port)
        self.host, self.port = self._seed.host, self._seed.port
        self._down: list[RedisHandle] = []
        self._paused: RedisHandle | None = None

    @property
    def url(self) -> str:
        return self._seed.url

    def client_kwargs(self) -> dict[str, Any]:
        return self.owner().client_kwargs()

    def client(self, **overrides: Any) -> Any:
        return self.owner().client(**overrides)

    def owner(self) -> RedisHandle:
        return slot_owner(self.cluster, self.slot)

    def kill(self) -> None:
        victim = self.owner()
        victim.kill()
        self._down.append(victim)

    def stop(self) -> None:
        victim = self.owner()
        victim.stop()
        self._down.append(victim)

    def restart(self, timeout: float = 10.0) -> None:
        """Start what was killed or stopped again, and wait until the slot is served."""
        for server in self._down:
            server.restart(timeout)
        self._down.clear()

        def served() -> bool:
            try:
                with self.owner().client() as client:
                    return bool(client.ping())
            except Exception:
                return False

        wait_until(served, timeout=CLUSTER_READY_TIMEOUT_S, message=f"slot {self.slot} served")

    def pause(self) -> None:
        self._paused = self.owner()
        self._paused.pause()

    def resume(self) -> None:
        if self._paused is not None:
            self._paused.resume()
            self._paused = None

    def is_running(self) -> bool:
        return not self._down
