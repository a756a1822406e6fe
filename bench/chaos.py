"""Long chaos runs of the convergence checker against a real mesh.

    python -m bench.chaos --seed 7 --duration 600 --nodes 5

Starts ``--nodes`` real redis-server processes (appendonly, appendfsync always), runs the
seeded workload and fault schedule of :mod:`harness.faults` for ``--duration`` seconds, lets
the mesh quiesce and checks it. Prints the report (faults by kind, writes acknowledged, writes
lost, resurrections, time to converge after the last fault); on failure also the seed and the
fault schedule. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.faults import FAULT_KINDS, ChaosReport, run_chaos
from harness.mesh import redis_processes
from replication_engine.observability.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description="Long seeded chaos runs of a real mesh."
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults")
    parser.add_argument("--nodes", type=int, default=3, help="3 to 5")
    parser.add_argument("--keys", type=int, default=40, help="size of the shared key space")
    parser.add_argument("--rate", type=float, default=25.0, help="writes/s per node")
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        help="keys put on the first node before the faults (large tree nodes from the start)",
    )
    parser.add_argument(
        "--kinds", default=",".join(FAULT_KINDS), help="comma-separated fault kinds (default: all)"
    )
    parser.add_argument("--converge-timeout", type=float, default=180.0)
    parser.add_argument(
        "--stream-maxlen",
        type=int,
        default=None,
        help="local.stream_maxlen of every node (small: streams trim under load)",
    )
    parser.add_argument(
        "--no-membership",
        action="store_true",
        help="no node joining from latest at the start, and none forgotten at the end",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep servers' data and cursor dbs here (default: a temp dir)",
    )
    parser.add_argument(
        "--cluster-node",
        action="store_true",
        help="node a's store is a Redis Cluster (3 masters, 3 replicas): its Redis faults are "
        "failovers of the master holding its data",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=1,
        choices=(1, 16),
        help="every store in this many partitions (16: fanout 16, depth 2); the trim and "
        "corrupt faults act on one stream and are left out",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON too")
    parser.add_argument("--quiet", action="store_true", help="do not narrate faults")
    return parser


async def _run(args: argparse.Namespace, workdir: Path) -> ChaosReport:
    local: dict[str, Any] = {}
    if args.stream_maxlen is not None:
        local["stream_maxlen"] = args.stream_maxlen
    started = time.monotonic()

    def say(message: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    config: dict[str, Any] = {"local": local} if local else {}
    kinds = [k for k in args.kinds.split(",") if k]
    if args.partitions > 1:
        config["settings"] = {"merkle": {"fanout": 16, "depth": 2, "partitions": args.partitions}}
        kinds = [k for k in kinds if k not in ("trim", "corrupt")]
    with redis_processes(workdir) as make_server:
        return await run_chaos(
            args.seed,
            workdir,
            make_server,
            nodes=args.nodes,
            duration_s=args.duration,
            kinds=kinds,
            keys=args.keys,
            rate_per_node=args.rate,
            converge_timeout_s=args.converge_timeout,
            config=config or None,
            progress=say,
            membership=not args.no_membership,
            cluster_node=args.cluster_node,
            preload=args.preload,
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 3 <= args.nodes <= 5:
        print("--nodes: expected 3 to 5", file=sys.stderr)
        return 2
    # The engines' warnings narrate the very faults we inject; errors still show.
    setup_logging("ERROR", json_format=False)
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="re-chaos-")) if owned else args.workdir
    try:
        report = asyncio.run(_run(args, workdir))
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.render())
    if args.json:
        print(json.dumps(report.summary(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
