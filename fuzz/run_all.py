"""Run every fuzz target for a fixed time and report executions and crashes.

Each target runs on a *copy* of its seed corpus in a temporary directory, so a CI run never
dirties the tree with the thousands of inputs libFuzzer adds. Crash inputs are kept under
``fuzz/crashes/<target>/`` for reproduction: ``python fuzz/fuzz_<target>.py <crash file>``.

Usage: ``python fuzz/run_all.py [--seconds N] [--only cdc_decode,lag] [--jobs J]``. Targets run
``J`` at a time (default: one per CPU; each target is one single-threaded process), so CI's
fuzzing takes the time of ``ceil(targets / J)`` targets. Exits non-zero if any target crashed
(or could not run).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
CRASH_DIR = FUZZ_DIR / "crashes"
# Start-up (imports, loading the corpus) and shutdown on top of the fuzzing time itself.
GRACE_S = 120
# libFuzzer's names for the inputs it saves when something goes wrong.
ARTIFACT_PREFIXES = ("crash-", "leak-", "timeout-", "oom-", "slow-unit-")

_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(r"#(\d+)\s+DONE")
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)


@dataclass
class Result:
    target: str
    executions: int | None
    returncode: int
    crashes: list[Path]
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or bool(self.crashes)


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in FUZZ_DIR.glob("fuzz_*.py"))


def parse_executions(output: str) -> int | None:
    """Executions from libFuzzer's final stats, else its DONE line, else the last progress line."""
    for pattern in (_EXECUTED, _DONE, _PROGRESS):
        found = pattern.findall(output)
        if found:
            return int(found[-1])
    return None


def run_target(target: str, seconds: int, workdir: Path) -> Result:
    corpus = workdir / "corpus" / target
    seeds = CORPUS_DIR / target
    if seeds.is_dir():
        shutil.copytree(seeds, corpus)
    else:
        corpus.mkdir(parents=True)
    artifacts = workdir / "artifacts" / target
    artifacts.mkdir(parents=True)
    command = [
        sys.executable,
        str(FUZZ_DIR / f"fuzz_{target}.py"),
        f"-max_total_time={seconds}",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    log = workdir / f"{target}.log"
    with log.open("wb") as out:
        try:
            proc = subprocess.run(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=seconds + GRACE_S,
                cwd=FUZZ_DIR,
                check=False,
            )
            returncode, note = proc.returncode, ""
        except subprocess.TimeoutExpired:
            returncode, note = -1, f"did not finish within {seconds + GRACE_S}s"
    output = log.read_text("utf-8", "replace")
    saved = []
    for artifact in sorted(artifacts.iterdir()):
        if artifact.name.startswith(ARTIFACT_PREFIXES):
            dest = CRASH_DIR / target / artifact.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(artifact, dest)
            saved.append(dest)
    if returncode != 0 and not note:
        # Show the reason (a Python traceback ends the log) without the libFuzzer chatter.
        noise = ("INFO:", "#", "WARNING: Failed to find function")
        tail = [line for line in output.splitlines() if not line.startswith(noise)]
        note = "\n".join(tail[-25:])
    return Result(target, parse_executions(output), returncode, saved, note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30, help="fuzzing time per target")
    parser.add_argument("--only", default="", help="comma-separated targets (default: all)")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="targets run at a time"
    )
    args = parser.parse_args(argv)
    targets = discover()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = sorted(set(wanted) - set(targets))
        if unknown:
            parser.error(f"unknown targets {unknown}; known: {targets}")
        targets = wanted

    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    def run(target: str, workdir: Path) -> Result:
        print(f"fuzz {target}: running for {args.seconds}s", flush=True)
        result = run_target(target, args.seconds, workdir)
        status = "CRASH" if result.failed else "ok"
        execs = result.executions if result.executions is not None else "?"
        lines = [f"fuzz {target}: {status} executions={execs} returncode={result.returncode}"]
        lines += [f"  saved {crash.relative_to(FUZZ_DIR.parent)}" for crash in result.crashes]
        if result.failed and result.note:
            lines.append("  " + result.note.replace("\n", "\n  "))
        print("\n".join(lines), flush=True)  # one print: the lines of two targets never mix
        return result

    with tempfile.TemporaryDirectory(prefix="re-fuzz-") as tmp:
        # Threads only wait on each target's own process; map keeps the targets' order.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(run, targets, [Path(tmp)] * len(targets)))

    print()
    print(f"{'target':<14} {'executions':>12}  status")
    for r in results:
        execs = str(r.executions) if r.executions is not None else "?"
        print(f"{r.target:<14} {execs:>12}  {'CRASH' if r.failed else 'ok'}")
    failed = [r.target for r in results if r.failed]
    if failed:
        print(f"crashed: {', '.join(failed)} (inputs under fuzz/crashes/)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
