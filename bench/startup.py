"""Start-up of the sidecar: from process start to ``/ready`` answering 200. Prints figures.

    python -m bench.startup [--repeat N]

Each run starts ``replication-engine run --config FILE`` as an operator would, against a local
Redis and one peer (both real ``redis-server`` processes on free ports, empty, so no bootstrap
copies anything), and polls ``/ready`` every 5 ms until it answers 200. Its baseline, measured in
the same run, is the bare interpreter (``python -c pass``) and the import of the CLI module in a
fresh interpreter: start-up minus those is the engine's own work (connect, open the cursor
database, certify the store, first reads of the peer).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from bench.hot_path import servers
from replication_engine.testing import free_port

POLL_S = 0.005
DEADLINE_S = 30.0


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


def _config(path: Path, local_url: str, peer_url: str, port: int) -> Path:
    config = {
        "replication": {
            "local_node_id": "a",
            "local": {"redis_url": local_url},
            "peers": [{"node_id": "b", "redis_url": peer_url}],
            "cursor": {"sqlite_path": str(path / "cursors.db")},
            "http": {"listen": f"127.0.0.1:{port}"},
        }
    }
    file = path / "config.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


def _until_ready(port: int, process: subprocess.Popen[bytes]) -> float:
    """Seconds from now until /ready answers 200 (the caller started the process just before)."""
    started = time.perf_counter()
    url = f"http://127.0.0.1:{port}/ready"
    while time.perf_counter() - started < DEADLINE_S:
        if process.poll() is not None:
            raise RuntimeError(f"the sidecar exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"/ready did not answer 200 within {DEADLINE_S} s")


def run_once(workdir: Path) -> float:
    with servers(2, workdir) as (local, peer):
        port = free_port()
        config = _config(workdir, local.url, peer.url, port)
        argv = [sys.executable, "-m", "replication_engine", "run", "--config", str(config)]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return _until_ready(port, process)
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    bare = [_timed([sys.executable, "-c", "pass"]) for _ in range(args.repeat)]
    imports = [
        _timed([sys.executable, "-c", "import replication_engine.cli"]) for _ in range(args.repeat)
    ]
    ready = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="re-bench-startup-") as tmp:
            ready.append(run_once(Path(tmp) / str(i)))

    def show(name: str, values: list[float]) -> None:
        print(
            f"  {name:<34} median {statistics.median(values) * 1000:6.0f} ms "
            f"(range {min(values) * 1000:.0f}-{max(values) * 1000:.0f}, {len(values)} runs)"
        )

    print("start-up of replication-engine run, a local Redis and one peer, both empty")
    show("bare interpreter (python -c pass)", bare)
    show("import replication_engine.cli", imports)
    show("process start to /ready 200", ready)


if __name__ == "__main__":
    main()
