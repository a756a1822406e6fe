"""The ``replication-engine`` command: run, demo, status, verify."""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.metadata
import json
import logging
import os
import platform
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from replication_engine import __version__
from replication_engine.config import ConfigError, HttpConfig, load_config
from replication_engine.observability.logs import JsonFormatter, setup_logging
from replication_engine.redaction import redact_url

# Named, not __name__: run as `python -m replication_engine.cli` this module is __main__.
log = logging.getLogger("replication_engine.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("auto", "json", "text")
# The demo draws its own table and narrates its faults; the engine's warnings about those same
# faults would bury it, so it logs errors only unless --log-level says otherwise.
DEMO_LOG_LEVEL = "ERROR"
# `status` without --url asks a sidecar on this host listening where the config default says.
DEFAULT_STATUS_URL = f"http://{HttpConfig().listen}"


def _version_text() -> str:
    # Bug reports need the interpreter and the redis-py release as much as our own version.
    try:
        redis_py = importlib.metadata.version("redis")
    except importlib.metadata.PackageNotFoundError:
        redis_py = "not installed"
    return (
        f"replication-engine {__version__} "
        f"(Python {platform.python_version()}, redis-py {redis_py})"
    )


def _add_logging_options(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    """The logging options, accepted before the subcommand and after it alike.

    A subcommand's copy defaults to SUPPRESS: argparse would otherwise write the subcommand's
    default over a value given before the subcommand.
    """
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS if on_subcommand else None,
        help=f"one of {', '.join(LOG_LEVELS)}, any case (default INFO; {DEMO_LOG_LEVEL} for demo)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=argparse.SUPPRESS if on_subcommand else "auto",
        help="auto (the default): JSON unless stderr is a terminal",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    if value > _MAX_COUNT:
        # SQLite's integers (a quarantine row id, a LIMIT) end here.
        raise argparse.ArgumentTypeError(f"expected at most {_MAX_COUNT}, got {value}")
    return value


_MAX_COUNT = 2**63 - 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replication-engine",
        description="Mesh replication agent for Redis-backed store nodes.",
    )
    parser.add_argument("--version", action="version", version=_version_text())
    _add_logging_options(parser, on_subcommand=False)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("--config", required=True, help="YAML config file")

    demo = sub.add_parser("demo", help="a local multi-node mesh that converges, with faults")
    demo.add_argument(
        "--nodes", type=int, default=3, help="nodes, each with its own redis-server (default 3)"
    )
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of writes (default 20)")
    demo.add_argument(
        "--rate", type=float, default=300.0, help="writes/s across the mesh (default 300)"
    )
    demo.add_argument(
        "--keys", type=int, default=200, help="size of the shared key space (default 200)"
    )
    demo.add_argument(
        "--no-faults",
        action="store_true",
        help="skip fault injection (a Redis killed and restarted, a stream trimmed)",
    )
    demo.add_argument(
        "--seed", type=int, default=1, help="seed of the write and fault schedule (default 1)"
    )
    demo.add_argument(
        "--cluster",
        action="store_true",
        help="node-0's store is a Redis Cluster (3 masters, 3 replicas; needs redis-cli), every "
        "store in 16 partitions spread over its masters, and the first fault kills the master "
        "holding partition 0",
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON too")

    status = sub.add_parser("status", help="a running sidecar's status (its /status)")
    status.add_argument(
        "--url",
        default=DEFAULT_STATUS_URL,
        help=f"the sidecar's HTTP base or its /status ({DEFAULT_STATUS_URL}); user:password@ "
        "in it is sent as HTTP Basic credentials",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="JSON: the sidecar's /status as it is, or with --mesh the table's facts",
    )
    status.add_argument(
        "--mesh", action="store_true", help="with --config: lag and root of every node in the mesh"
    )
    status.add_argument("--config", help="config file (for --mesh)")

    forget = sub.add_parser(
        "forget", help="forget a member gone for good (tombstone collection stops waiting)"
    )
    forget.add_argument("node", help="the member's node id")
    forget.add_argument("--config", required=True, help="this node's config file")
    forget.add_argument(
        "--force",
        action="store_true",
        help="forget it even though its store still answers (its writes are then dropped)",
    )

    migrate = sub.add_parser(
        "migrate",
        help="convert this node's store from format 1 to format 2 in place (engine stopped)",
        description="Resumable: run it again after an interruption. Exit status 0 when the "
        "store is in format 2 afterwards (or --dry-run described it), 1 when it stopped.",
    )
    migrate.add_argument("--config", required=True, help="this node's config file")
    migrate.add_argument(
        "--dry-run", action="store_true", help="say what it would do, change nothing"
    )
    migrate.add_argument(
        "--batch", type=_positive_int, default=1000, help="keys per step (default 1000)"
    )

    functions_cmd = sub.add_parser(
        "functions", help="the store's Redis Functions library (docs/FORMAT.md, 'Functions')"
    )
    functions_cmd.add_argument("action", choices=["load"], help="load: load or upgrade it")
    functions_cmd.add_argument("--config", required=True, help="this node's config file")

    verify = sub.add_parser(
        "verify",
        help="compare Merkle roots with every peer",
        description="Exit status: 0 every check passed, 1 something differs (roots, the tree, "
        "or with --deep a payload or key), 2 nothing differed but something could not be "
        "checked (a node unreachable, another tree geometry).",
    )
    verify.add_argument("--config", required=True)
    verify.add_argument(
        "--limit", type=_positive_int, default=20, help="divergent keys to list per peer"
    )
    verify.add_argument(
        "--deep",
        action="store_true",
        help="also re-hash every stored payload against its content hash and list keys under "
        "the prefix that the format does not define or that have the wrong type (one pass "
        "over the local store)",
    )
    verify.add_argument(
        "--tree",
        choices=["check", "repair"],
        help="also check the local Merkle tree against its leaves (repair: rebuild what differs)",
    )
    quarantine = sub.add_parser(
        "quarantine",
        help="what this node set aside: rejected entries and values dropped or written off",
        description="Reads the cursor database (cursor.sqlite_path) read-only, beside a "
        "running sidecar or without one. Exit status: 0, 1 when --value finds no whole value "
        "in the row, 2 when there is no such row, the database cannot be read, or --value "
        "would write binary data to a terminal.",
    )
    quarantine.add_argument("--config", required=True, help="this node's config file")
    quarantine.add_argument("--limit", type=_positive_int, default=20, help="rows (default 20)")
    quarantine.add_argument("--peer", help="only rows of this peer (or of this node's own drops)")
    quarantine.add_argument(
        "--reason", help="only reasons starting with this, e.g. absent_on_peer, hash_mismatch"
    )
    quarantine.add_argument("--key", help="only rows of this key")
    quarantine.add_argument("--json", action="store_true", help="one JSON object per row, raw")
    quarantine.add_argument(
        "--value",
        type=_positive_int,
        metavar="ID",
        help="write the value row ID carried to stdout, decompressed and checked against its "
        "content hash (to write it again)",
    )
    for command in sub.choices.values():
        _add_logging_options(command, on_subcommand=True)
    return parser


def _report_failure(json_format: bool, event: str, text: str, **fields: Any) -> None:
    """Say on stderr why the command cannot go on: ``text`` as is, or one JSON log line.

    The JSON line is what :class:`JsonFormatter` makes of an ERROR record with ``event`` as its
    message and ``fields`` as its extras, so a log pipeline reading a container's stderr parses
    a failed start like every other line (strings redacted the same way). It is formatted here
    rather than logged, so it appears whoever configured logging and whatever the level.
    """
    if json_format:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, event, (), None, extra=fields)
        text = JsonFormatter().format(record)
    print(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Decided once, for the log lines and for the failures reported below alike.
    json_format = {"auto": not sys.stderr.isatty(), "json": True, "text": False}[args.log_format]
    level = args.log_level or (DEMO_LOG_LEVEL if args.command == "demo" else "INFO")
    setup_logging(level, json_format=json_format)
    try:
        if args.command == "run":
            return asyncio.run(_run(args.config, json_format=json_format))
        if args.command == "demo":
            return asyncio.run(_demo(args, json_format=json_format))
        if args.command == "status":
            if args.mesh:
                if not args.config:
                    _report_failure(
                        json_format,
                        "cli.usage_error",
                        "status --mesh needs --config FILE",
                        error="status --mesh needs --config FILE",
                    )
                    return 2
                from replication_engine.tools import mesh_status

                return asyncio.run(mesh_status(load_config(args.config), as_json=args.json))
            return _status(args.url, raw=args.json, json_format=json_format)
        if args.command == "verify":
            from replication_engine.tools import verify

            return asyncio.run(
                verify(load_config(args.config), limit=args.limit, tree=args.tree, deep=args.deep)
            )
        if args.command == "migrate":
            from replication_engine.tools import migrate

            return asyncio.run(
                migrate(load_config(args.config), dry_run=args.dry_run, batch=args.batch)
            )
        if args.command == "functions":
            from replication_engine.tools import load_functions

            return asyncio.run(load_functions(load_config(args.config)))
        if args.command == "quarantine":
            from replication_engine.tools import quarantine, quarantine_value

            config = load_config(args.config)
            if args.value is not None:
                return quarantine_value(config, args.value)
            return quarantine(
                config,
                limit=args.limit,
                peer=args.peer,
                reason=args.reason,
                key=args.key,
                as_json=args.json,
            )
        if args.command == "forget":
            from replication_engine.tools import forget

            return asyncio.run(forget(load_config(args.config), args.node, force=args.force))
    except ConfigError as exc:
        _report_failure(
            json_format,
            "config.invalid",
            f"configuration error:\n{exc}",
            error=f"{type(exc).__name__}: {exc}",
            problems=list(exc.problems),
            source=exc.source,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`quarantine | head`): what it did not read is not an error of
        # this command, and Python's own flush at exit must not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2


async def _run(config_path: str, *, json_format: bool) -> int:
    from replication_engine.engine import ReplicationEngine
    from replication_engine.errors import ReplicationError

    config = load_config(config_path)
    engine = ReplicationEngine(config)
    loop = asyncio.get_running_loop()
    # The first of these signals: each drains and stops the engine alike. SIGHUP too, which a
    # closed terminal or a supervisor sends and whose default action would kill the process
    # without saving a cursor.
    stop: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, _stop_on, stop, sig)
    try:
        await engine.start()
    except ReplicationError as exc:  # the engine's own refusals (another node's store, ...)
        _report_failure(
            json_format,
            "engine.start_failed",
            f"cannot start: {exc}",
            node=config.local_node_id,
            error=f"{type(exc).__name__}: {exc}",
        )
        return 1
    log.info(
        "cli.running",
        extra={
            "node": config.local_node_id,
            "http_url": engine.http.url if engine.http else None,
            "peer_urls": [redact_url(p.redis_url) for p in config.peers],
        },
    )
    received = await stop
    log.info("cli.signal_received", extra={"signal": received.name, "hint": "shutting down"})
    await engine.shutdown()
    return 0


def _stop_on(stop: asyncio.Future[signal.Signals], sig: signal.Signals) -> None:
    """Resolve ``stop`` with the first signal; one sent again while draining changes nothing."""
    if not stop.done():
        stop.set_result(sig)


async def _demo(args: argparse.Namespace, *, json_format: bool) -> int:
    from replication_engine.demo import run_demo
    from replication_engine.testing.cluster import redis_cli_binary
    from replication_engine.testing.redis_proc import RedisBinaryNotFound, find_redis_server

    try:
        # Before any node starts: the demo needs a redis-server that a plain install lacks.
        find_redis_server()
    except RedisBinaryNotFound as exc:
        _report_failure(
            json_format,
            "demo.redis_server_not_found",
            f"demo: {exc}",
            error=f"{type(exc).__name__}: {exc}",
        )
        return 2
    if args.cluster and redis_cli_binary() is None:
        _report_failure(
            json_format,
            "demo.redis_cli_not_found",
            "demo: --cluster needs redis-cli (beside redis-server or on PATH) to create a cluster",
        )
        return 2
    result = await run_demo(
        nodes=args.nodes,
        duration=args.duration,
        rate=args.rate,
        keys=args.keys,
        faults=not args.no_faults,
        seed=args.seed,
        cluster=args.cluster,
    )
    if args.json:
        print(json.dumps({k: v for k, v in result.as_dict().items() if k != "events"}, indent=2))
    return 0 if result.converged else 1


def _status(url: str, *, raw: bool, json_format: bool) -> int:
    status_url = _status_endpoint(url)
    try:
        with urllib.request.urlopen(_get_with_credentials(status_url), timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        # It answered: whatever is wrong is not the network, and saying so sends the operator
        # to the right place (credentials, or an address that is not the sidecar's).
        _report_failure(
            json_format,
            "status.refused",
            f"{redact_url(status_url)} answered HTTP {exc.code} {exc.reason}: "
            + _HTTP_HINTS.get(exc.code, "not the sidecar's status"),
            url=redact_url(url),
            error=f"HTTP {exc.code}",
        )
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        error = redact_url(str(exc))
        _report_failure(
            json_format,
            "status.unreachable",
            f"cannot read {redact_url(status_url)}: {error}",
            url=redact_url(url),
            error=f"{type(exc).__name__}: {error}",
        )
        return 1
    if raw:
        print(json.dumps(body, indent=2))
        return 0
    print(
        f"node {body['node_id']}  state {body['state']}  mode {body['mode']}  "
        f"local circuit {body['local_circuit']}"
    )
    membership = body.get("membership") or {}
    if membership.get("state") not in (None, "ok"):
        # A store that may have lost writes: the one line an operator must not miss.
        print(f"RECOVERING: {membership.get('reason') or '-'}")
        print(f"  waiting for a complete repair from: {membership.get('recovery_pending')}")
    print(
        f"{'peer':<16} {'conn':<5} {'circuit':<10} {'mode':<14} {'lag ms':>8} "
        f"{'lag ev':>7} {'applied':>8} {'quarant.':>8} {'gaps':>5}"
    )
    for peer_id, p in body["peers"].items():
        print(
            f"{peer_id:<16} {'yes' if p['connected'] else 'NO':<5} {p['circuit']:<10} "
            f"{p.get('mode', '-'):<14} {_dash(p.get('lag_ms')):>8} "
            f"{_dash(p.get('lag_events')):>7} {p.get('events_applied', 0):>8} "
            f"{p.get('events_quarantined', 0):>8} {p.get('events_gaps', 0):>5}"
        )
    if membership:
        held = membership.get("held_back_by")
        behind = membership.get("stable_frontier_age_sec")
        print(
            f"tombstones {membership.get('tombstones')}  collected {membership.get('collected')}"
            f"  stable frontier {_dash(behind)}{'s' if behind is not None else ''} behind now"
            + (f"  HELD BACK BY {held}" if held else "")
        )
    return 0


_HTTP_HINTS = {
    401: "the user or password was refused (give them as http://user:password@host:port)",
    403: "the user or password was refused (give them as http://user:password@host:port)",
    404: "nothing is served there: is this the sidecar's http address?",
}


def _status_endpoint(url: str) -> str:
    """The sidecar's ``/status`` from its base address or from ``/status`` itself, with or
    without a trailing ``/``; a query string is kept where it belongs, after the path."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith("/status"):
        path += "/status"
    return parts._replace(path=path).geturl()


def _get_with_credentials(url: str) -> urllib.request.Request:
    """A GET of ``url`` that sends its ``user:password@``, if any, as HTTP Basic credentials:
    urllib would take them for part of the host name."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url)
    userinfo, _at, host = parts.netloc.rpartition("@")
    user, _colon, password = userinfo.partition(":")
    token = base64.b64encode(
        f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    ).decode("ascii")
    request = urllib.request.Request(parts._replace(netloc=host).geturl())
    # Unredirected: a redirect elsewhere does not carry the password along.
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
