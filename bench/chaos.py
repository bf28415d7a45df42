"""Chaos run: inject a seeded set of faults into real nanochat runs (base_train on CPU, fp32, gloo; S3 on loopback
behind a fault-injecting proxy) and print what survived.

    .venv/bin/python bench/chaos.py [--seed 0] [--only WORD] [--markdown]

Every row is a scenario from tests/faults/harness.py, the code tests/faults/ asserts on: it injects the fault,
re-runs where a re-run is the recovery, and checks the end state against an uninterrupted run (torch.equal on
every weight) and an audit of the store (every visible checkpoint/manifest whole, digests verified).

    survived      yes: finished with exactly the uninterrupted run's weights | clear error: one error line naming
                  the object, no traceback, exit != 0 | detected: the damage was refused or routed around
    data lost     what the fault cost beyond time ("none": nothing)
    steps redone  training steps done twice because of the fault (bounded by --save-every)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def scenarios(h, seed: int):
    """(name, callable(lab) -> Result | list[Result]) in table order."""
    return [
        ("sigterm", lambda lab: h.sigterm_mid_step(lab)),
        ("sigkill-rank0", lambda lab: h.sigkill_one_rank(lab, rank=0, seed=seed)),
        ("sigkill-rank1", lambda lab: h.sigkill_one_rank(lab, rank=1, seed=seed + 1)),
        ("sigterm-ckpt", lambda lab: h.sigterm_during_checkpoint_write(lab)),
        ("sigkill-ckpt", lambda lab: h.sigkill_during_checkpoint_write(lab)),
        ("runner", lambda lab: h.runner_killed(lab)),
        ("s3-chaos", lambda lab: h.s3_chaos(lab, seed=seed, rate=0.1)),
        ("s3-chaos-heavy", lambda lab: h.s3_chaos(lab, seed=seed + 1, rate=0.25)),
        ("missing-bucket", lambda lab: h.missing_bucket(lab)),
        ("bad-credentials", lambda lab: h.access_denied(lab)),
        ("denied-mid-run", lambda lab: h.access_denied(lab, mid_run=True)),
        ("unreachable", lambda lab: h.endpoint_unreachable(lab)),
        ("disk-full", lambda lab: h.disk_full(lab)),
        ("scratch-full", lambda lab: h.scratch_full(lab)),
        ("checkpoint-corruption", lambda lab: [h.corrupt_checkpoint(lab, how) for how in h.CORRUPTIONS]),
        ("shard-bitflip", lambda lab: [h.shard_row_group_corruption(lab, seeds=range(seed, seed + 3), checksummed=c)
                                       for c in (True, False)]),
    ]


COLUMNS = ("fault", "injected", "survived", "data lost", "steps redone", "time")


def row(r, seconds: float) -> dict:
    survived = r.survived if r.ok else "NO (see below)"
    return {"fault": r.fault, "injected": r.injected or "-", "survived": survived, "data lost": r.data_lost,
            "steps redone": r.steps_redone, "time": f"{seconds:.1f}s"}


def print_table(rows: list[dict], markdown: bool):
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    if markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "|".join("---" for _ in COLUMNS) + "|")
        for r in rows:
            print("| " + " | ".join(r[c] for c in COLUMNS) + " |")
        return
    print("  ".join(c.upper().ljust(widths[c]) for c in COLUMNS))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in COLUMNS))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seeds the S3 fault sequence, kill timing and bit flips")
    p.add_argument("--only", action="append", help="run only scenarios whose name contains this (repeatable)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (docs/reliability.md)")
    p.add_argument("--keep", action="store_true", help="keep the scenario folders (logs, stores) for inspection")
    args = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    import torch
    torch.set_num_threads(1)
    from tests.faults import harness as h

    names = [name for name, _ in scenarios(h, args.seed)]
    if args.only and not any(w in name for name in names for w in args.only):
        sys.exit(f"chaos: --only {args.only} matches no scenario; scenarios: {', '.join(names)}")
    workdir = Path(tempfile.mkdtemp(prefix="nanochat-chaos-"))
    os.environ["TMPDIR"] = str(workdir)
    tempfile.tempdir = None
    lab = h.Lab(workdir / "lab")
    rows, failed = [], []
    t_all = time.perf_counter()
    try:
        for name, run in scenarios(h, args.seed):
            if args.only and not any(w in name for w in args.only):
                continue
            t0 = time.perf_counter()
            try:
                results = run(lab)
            except Exception as e:  # noqa: BLE001 - a scenario that breaks is a row, not the end of the table
                results = h.Result(name, survived=f"NO: harness error {type(e).__name__}: {e}", ok=False)
            results = results if isinstance(results, list) else [results]
            dt = (time.perf_counter() - t0) / len(results)
            for r in results:
                rows.append(row(r, dt))
                if not r.ok:
                    failed.append(r)
            print(f"[chaos] {name}: {'ok' if all(r.ok for r in results) else 'NOT OK'} ({time.perf_counter() - t0:.1f}s)",
                  file=sys.stderr, flush=True)
    finally:
        lab.close()
        if not args.keep:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(rows, args.markdown)
    print(f"\n{len(rows)} faults injected, {len(rows) - len(failed)} handled as expected, {len(failed)} not "
          f"({time.perf_counter() - t_all:.0f}s on {os.cpu_count()} CPUs, seed {args.seed})")
    for r in failed:
        print(f"  NOT OK: {r.fault}: {'; '.join(r.notes)[:400]}")
    if args.keep:
        print(f"scenario folders kept in {workdir}")


if __name__ == "__main__":
    main()
