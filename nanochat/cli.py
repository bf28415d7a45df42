"""`nanochat` command line: speedrun, stage, status, report, data, chat, serve."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

# subcommands implemented in their own modules: (module, function, what it does)
DELEGATED = {
    "data": ("nanochat.dataset", "cli", "data recipe | download | prepare: pretraining shards"),
    "chat": ("nanochat.chat_cli", "main", "chat with a trained model in the terminal"),
    "serve": ("nanochat.serve", "main", "web UI + OpenAI-compatible API"),
}


def store_uri(args) -> str:
    from nanochat.store import default_store_uri, mistyped_store_uri
    uri = getattr(args, "store", None) or os.environ.get("NANOCHAT_STORE")
    if uri and (why := mistyped_store_uri(uri)):
        error(why)
    run = getattr(args, "run", None)
    if uri and run:
        return uri.rstrip("/") + "/" + run
    return uri or default_store_uri(run or "default")


def local_dir(uri: str) -> Path | None:
    """The folder of a file:// (or bare path) store URI, as nanochat.store.LocalStore reads it; None for s3://."""
    if urlparse(uri).scheme not in ("", "file"):
        return None
    return Path(urlparse(uri).path if uri.startswith("file://") else uri)


def open_run(uri: str):
    """(store, None) when a run is there; (store or None, why not) otherwise. Creates no folder."""
    from nanochat.runner import STATE_KEY
    from nanochat.store import open_store
    path = local_dir(uri)
    if path is not None and not path.is_dir():
        return None, "no such folder"
    store = open_store(uri)
    if not store.list("stages/") and not store.exists(STATE_KEY):
        return store, "no stages/ in it"
    return store, None


def no_run(uri: str, why: str) -> str:
    return f"no run at {uri} ({why}): start one with `{command_name()} speedrun --store {uri}`"


class NoStore:
    """Stands in for a store folder that does not exist yet (dry run): empty, and nothing gets created."""

    def __init__(self, path: Path):
        self.root = "file://" + str(path.resolve())

    def get_json_or(self, key: str, default=None):
        return default


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; "(default: X)" after every flag that has a default worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default in (None, []) or action.default is False or action.default is argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_store_flags(p: argparse.ArgumentParser):
    p.add_argument("--store", help="artifact store: file:///dir or s3://bucket/prefix (env NANOCHAT_STORE; default ~/.cache/nanochat/runs/<run>)")
    p.add_argument("--run", help="run name: a sub-prefix of --store, or ~/.cache/nanochat/runs/<run> without it")


def error(msg: str, code: int = 2):
    print(f"nanochat: error: {msg}", file=sys.stderr)
    sys.exit(code)


def torch_build() -> str:
    import torch
    return f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build")


def version_line() -> str:
    import platform

    from nanochat import version
    return f"nanochat-k8s {version()} ({torch_build()}, Python {platform.python_version()})"


class VersionAction(argparse.Action):
    """--version without importing torch for every other command (argparse's own takes the string up front)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from nanochat import profiles
    p = argparse.ArgumentParser(
        prog="nanochat",
        description="The nanochat LLM pipeline: tokenizer → pretraining → midtraining → SFT → RL → eval → report → chat.",
        epilog="Start with `nanochat speedrun` (tiny profile on CPU, minutes). Then `nanochat chat` or `nanochat serve`.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=VersionAction, help="print the versions of nanochat-k8s, torch and Python and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    sp = sub.add_parser("speedrun", help="run the whole pipeline (resumes where it stopped)", formatter_class=HelpFormatter,
                        description="Run every stage in order through the local runner; re-running resumes.")
    sp.add_argument("--profile", default="auto", help=f"one of {', '.join(profiles.names())} (auto: tiny without a GPU, d20 with)")
    add_store_flags(sp)
    sp.add_argument("--from", dest="from_step", metavar="STAGE", help="re-run from this stage on (earlier stages must be done)")
    sp.add_argument("--only", action="append", metavar="STAGE", help="re-run only this stage (repeatable)")
    sp.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="override a stage flag (repeatable); a bare KEY=VALUE applies to every stage that has --KEY (an error if none has it)")
    sp.add_argument("--config", help="YAML/JSON config file passed to every stage")
    sp.add_argument("--rl", action=argparse.BooleanOptionalAction, default=None, help="run chat_rl (default: on for CPU profiles, off for GPU ones)")
    sp.add_argument("--nproc", type=int, metavar="N",
                    help="processes (GPUs) per GPU stage, as torchrun --nproc_per_node (default: the profile's, 8 for d20, or the "
                         "GPUs this machine has if fewer; gradient accumulation keeps the batch). Resume with the same N")
    sp.add_argument("--max-retries", type=int, default=1, help="retries per failed stage; each run of this command gets them all afresh")
    sp.add_argument("--wandb", metavar="RUN", help="log training stages to Weights & Biases under this run name")
    sp.add_argument("--dry-run", action="store_true", help="validate every stage's config and print the plan, run nothing")

    st = sub.add_parser("stage", help="run one stage (same as: python -m nanochat.stages.NAME)", add_help=False)
    st.add_argument("name", nargs="?", help="stage name")
    st.add_argument("rest", nargs=argparse.REMAINDER)

    s = sub.add_parser("status", help="table of stage states, durations and key metrics; who drives the run; why a stage failed",
                       formatter_class=HelpFormatter)
    add_store_flags(s)
    r = sub.add_parser("report", help="generate the report card and copy it to ./report.md", formatter_class=HelpFormatter)
    add_store_flags(r)
    r.add_argument("-o", "--output", default="report.md", help="where to copy the report (figures go next to it)")
    for name, (_, _, help_text) in DELEGATED.items():
        d = sub.add_parser(name, help=help_text, add_help=False)
        d.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def cmd_stage(args) -> int:
    from nanochat.pipeline import MODULES, module_exists
    available = [m for m in MODULES if module_exists(m)]
    if not args.name or args.name in ("-h", "--help"):
        print("usage: nanochat stage NAME [--key=value ...]\n\nstages: " + ", ".join(available))
        print("run `nanochat stage NAME --help` for a stage's flags; under torchrun: torchrun --nproc_per_node=N -m nanochat.stages.NAME")
        return 0
    if not module_exists(args.name):
        error(f"unknown stage {args.name!r}; available: {', '.join(available)}")
    mod = importlib.import_module(f"nanochat.stages.{args.name}")
    from nanochat import stage
    stage.OWN_PROCESS = True  # this process runs the one stage
    return mod.main(args.rest)


def cmd_speedrun(args) -> int:
    from nanochat import profiles
    from nanochat.config import ConfigError, resolve_profile
    from nanochat.pipeline import steps_for
    from nanochat.report import Report
    from nanochat.runner import LOCK_KEY, STATE_KEY, PipelineError, Runner, failure_notes, parse_overrides, status_rows
    from nanochat.store import StoreError, check_reachable, open_store
    uri, why = store_uri(args), None
    try:
        profile = resolve_profile(args.profile)
        nproc, note = stage_processes(profile, args.nproc, args.dry_run)  # before the store: a refusal creates nothing
        if args.dry_run:  # look, but create nothing: a new store stays uncreated
            store, why = open_run(uri)
            store = store or NoStore(local_dir(uri))
        else:
            store = open_store(uri)
            check_reachable(store)
        steps = steps_for(profile, rl=args.rl)
        overrides = parse_overrides(args.set, steps)
        if args.config:
            overrides.setdefault("*", []).append(f"--config={os.path.abspath(args.config)}")
        if args.wandb:
            os.environ["NANOCHAT_WANDB_RUN"] = args.wandb  # stages with a wandb_run key pick it up from the env layer
        runner = Runner(store, steps, profile, max_retries=args.max_retries, overrides=overrides, nproc=nproc)
        plan = runner.plan(args.from_step, args.only)
    except (ConfigError, StoreError, PipelineError) as e:
        error(str(e))
    if not steps:
        error("no stages are available in this install")
    print(f"nanochat speedrun: profile {profile}, store {store.root}, {len(plan)} stage(s): " + " → ".join(s.name for s, *_ in plan), file=sys.stderr)
    if note:
        print(f"note: {note}", file=sys.stderr)
    sized = profiles.get(profile)
    if sized["gpus_per_node"]:
        print_budget(profile, overrides, (nproc or sized["gpus_per_node"]) * sized["nodes"], store)
    if args.dry_run:
        if why:
            print(f"no run at {uri} yet ({why}): every stage would run", file=sys.stderr)
        for s, a, reason in runner.preview(plan):  # the runner's own decisions, so the two cannot drift
            print(f"  {s.name:<14} {f'to run ({reason})' if reason else 'done':<40} nproc={runner.nproc_for(s)} {' '.join(a)}")
        return 0
    if not store.exists(STATE_KEY) and not store.exists(LOCK_KEY):
        Report(store).reset(extra={"profile": profile, "store": store.root})
    t0 = time.time()
    try:
        ok = runner.run(args.from_step, args.only)
    except (ConfigError, StoreError, PipelineError) as e:
        error(str(e))
    text = Report(store).generate(stage_order=[s.name for s in steps])
    print_table(status_rows(store, steps))
    for line in failure_notes(store):
        print(line)
    print(f"\nreport: {store.uri('report/report.md')} ({len(text.splitlines())} lines); `nanochat report` copies it here", file=sys.stderr)
    if not ok:
        print(f"speedrun stopped after {time.time() - t0:.0f}s; re-run the same command to resume", file=sys.stderr)
        return 130 if runner.interrupted else 1
    cmd = command_name()
    print(f"speedrun finished in {time.time() - t0:.0f}s. Talk to your model:\n"
          f"  {cmd} chat --store {store.root}\n  {cmd} serve --store {store.root}", file=sys.stderr)
    return 0


def visible_gpus() -> int:
    """CUDA GPUs torch sees here (0 with a CPU build of torch or without a driver)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def stage_processes(profile: str, requested: int | None, dry_run: bool) -> tuple[int | None, str | None]:
    """(processes per GPU stage, None for the profile's; a note for the user), fitted to this machine's GPUs.
    Refused (ConfigError) before anything runs: a GPU profile on a machine without one, more processes than GPUs."""
    from nanochat import profiles
    from nanochat.config import ConfigError
    if requested is not None and requested < 1:
        raise ConfigError(f"--nproc: expected a positive number of processes, got {requested}")
    sized_for = profiles.get(profile)["gpus_per_node"]
    if not sized_for:
        return requested, None  # a CPU profile: processes are gloo ranks, any number works
    have = visible_gpus()
    if requested is not None:
        if have and requested > have:
            raise ConfigError(f"--nproc {requested}: this machine has {have} CUDA GPU(s); pass --nproc {have} or fewer")
        return requested, None if have else f"no CUDA GPU here: the {profile} stages run {requested} process(es) on the CPU"
    if not have:
        why = f"profile {profile} is sized for {sized_for} GPUs and torch sees no CUDA GPU here ({torch_build()})"
        if dry_run:
            return None, why + ": a real run would stop here"
        raise ConfigError(why + "; on the CPU use --profile tiny (or force it with --nproc N)")
    if have < sized_for:
        fit = max(n for n in range(1, have + 1) if sized_for % n == 0)  # the profile's batch splits evenly over them
        return fit, (f"this machine has {have} GPU(s): the GPU stages run {fit} process(es) instead of {sized_for}; "
                     f"gradient accumulation keeps the batch, so base_train takes ~{sized_for / fit:.0f}x longer")
    return None, None


def command_name() -> str:
    """How the user can type this command: `nanochat` when it is on PATH, else the venv's script (after `make speedrun`)."""
    import shutil
    if shutil.which("nanochat"):
        return "nanochat"
    script = Path(sys.executable).parent / "nanochat"
    if script.exists():
        try:
            return os.path.relpath(script)
        except ValueError:
            return str(script)
    return f"{sys.executable} -m nanochat.cli"


def print_budget(profile: str, overrides: dict, gpus: int, store):
    """The plan before a GPU run: params, tokens, shards, FLOPs, hours and dollars (base_train's settings)."""
    from nanochat import dataset
    from nanochat.config import parse_config
    from nanochat.report import DEFAULT_GPU_HOUR_COST
    from nanochat.stages.base_train import Config
    cfg = parse_config(Config, [f"--profile={profile}", *overrides.get("*", []), *overrides.get("base_train", [])], "base_train")
    r = dataset.recipe(cfg.depth, cfg.target_param_data_ratio, seq_len=cfg.max_seq_len, gpus=gpus, store=store)
    print(dataset.format_recipe([r]), file=sys.stderr)
    print(f"plan: {r['train_flops']:.3g} training FLOPs ≈ {r['hours']:.1f} h of base_train on {gpus} GPU{'s' if gpus != 1 else ''} "
          f"≈ ${r['hours'] * gpus * DEFAULT_GPU_HOUR_COST:,.0f} at ${DEFAULT_GPU_HOUR_COST}/GPU-hour (NANOCHAT_GPU_HOUR_COST); "
          f"the chat stages add roughly a quarter", file=sys.stderr)


def print_table(rows: list[dict]):
    if not rows:
        print("no stages have run in this store yet")
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def cmd_status(args) -> int:
    from nanochat.pipeline import steps_for
    from nanochat.runner import STATE_KEY, failure_notes, runner_status, status_rows
    from nanochat.store import StoreError
    uri = store_uri(args)
    try:
        store, why = open_run(uri)
        if why:
            print(no_run(uri, why))
            return 0
        state = store.get_json_or(STATE_KEY) or {}
        steps = steps_for(state["profile"]) if state.get("profile") else None
        rows, runner, failures = status_rows(store, steps), runner_status(store), failure_notes(store)
    except StoreError as e:
        error(str(e), 1)
    print(f"store: {store.root}" + (f"   profile: {state['profile']}" if state.get("profile") else ""))
    print_table(rows)
    for line in [*failures, *([runner] if runner else [])]:
        print(line)
    return 0


def cmd_report(args) -> int:
    from nanochat.pipeline import STEPS
    from nanochat.report import Report
    from nanochat.store import StoreError
    uri = store_uri(args)
    try:
        store, why = open_run(uri)
        if why:
            error(no_run(uri, why), 1)
        text = Report(store).generate(stage_order=[s.name for s in STEPS])
        out = Path(args.output)
        fig_dir = out.parent / (out.stem + "_figures")
        figs = [k for k in store.list("report/figures/")]
        for key in figs:
            fig_dir.mkdir(parents=True, exist_ok=True)
            store.get_file(key, fig_dir / Path(key).name)
        out.write_text(text.replace("](figures/", f"]({fig_dir.name}/"))
    except StoreError as e:
        error(str(e), 1)
    print(f"wrote {out} ({len(text.splitlines())} lines, {len(figs)} figures in {fig_dir}/) from {store.uri('report/report.md')}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in DELEGATED:
        mod_name, fn, _ = DELEGATED[argv[0]]
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                error(f"`nanochat {argv[0]}` is not available in this install")
            raise
        return getattr(mod, fn)(argv[1:]) or 0
    if argv and argv[0] == "stage":
        args = argparse.Namespace(name=argv[1] if len(argv) > 1 else None, rest=argv[2:])
        return cmd_stage(args)
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return 0
    return {"speedrun": cmd_speedrun, "status": cmd_status, "report": cmd_report}[args.cmd](args) or 0


if __name__ == "__main__":
    sys.exit(main())
