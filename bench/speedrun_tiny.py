"""Time the tiny speedrun end to end: wall time per stage, the total, and the report card's metric table.

    python bench/speedrun_tiny.py                  # fresh store in a temp dir, profile tiny
    python bench/speedrun_tiny.py --profile ci     # the reduced profile the test suite runs
    python bench/speedrun_tiny.py --store file:///tmp/run --set base_train.num_iterations=600

Target (issue #14): total ≤ 15 min on a 2-core CPU, with accuracy rising base → mid → sft → rl.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 15 * 60


def run_speedrun(profile: str, store_uri: str, overrides: list[str]) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "nanochat.cli", "speedrun", "--profile", profile, "--store", store_uri]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.time()
    rc = subprocess.call(cmd)
    return rc, time.time() - t0


def stage_table(store_uri: str, profile: str) -> list[tuple[str, str, str]]:
    from nanochat.pipeline import steps_for
    from nanochat.runner import status_rows
    from nanochat.store import open_store
    return [(r["stage"], r["state"], r["duration"]) for r in status_rows(open_store(store_uri), steps_for(profile))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="tiny")
    p.add_argument("--store", help="store URI (default: a fresh temp dir, so every stage runs)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE", help="passed to `nanochat speedrun --set`")
    args = p.parse_args(argv)

    tmp = None
    if not args.store:
        tmp = tempfile.mkdtemp(prefix="speedrun-bench-")
        args.store = Path(tmp, "store").as_uri()
    rc, wall = run_speedrun(args.profile, args.store, args.set)

    from nanochat.report import load_done_markers, report_card
    from nanochat.store import open_store
    print(f"\n## speedrun --profile {args.profile}: {os.cpu_count()} CPUs, exit code {rc}\n")
    print("| stage | state | wall time |\n|---|---|---|")
    for stage, state, dur in stage_table(args.store, args.profile):
        print(f"| {stage} | {state} | {dur} |")
    verdict = "within" if wall <= TARGET_S else "OVER"
    print(f"| **total (incl. runner)** | | **{wall / 60:.1f} min** ({verdict} the {TARGET_S // 60} min target) |\n")
    print(report_card(load_done_markers(open_store(args.store))))
    print(f"store: {args.store}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
