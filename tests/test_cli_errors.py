"""The `nanochat` CLI on user mistakes and missing runs: one clear line, nothing created, a dry run that tells the truth."""
from __future__ import annotations

from pathlib import Path

import pytest

from nanochat.cli import main
from nanochat.pipeline import steps_for
from nanochat.runner import Runner
from nanochat.store import open_store


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main(list(argv)) or 0
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def error_lines(err: str) -> list[str]:
    """stderr without argparse's usage block (its first line and the indented continuation lines)."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]


def dry_run_rows(out: str) -> dict[str, str]:
    """`  stage  done | to run (why)  nproc=..` rows → {stage: status}."""
    return {line.split()[0]: line.split(None, 1)[1].split(" nproc=")[0].strip() for line in out.splitlines() if line.startswith("  ")}


def finished_tiny_store(tmp_path):
    """A store where every tiny stage is done with its current config, finished in pipeline order."""
    uri = f"file://{tmp_path / 'store'}"
    store = open_store(uri)
    runner = Runner(store, steps_for("tiny"), "tiny")
    for i, (_, _, name, h, _) in enumerate(runner.plan()):
        store.put_json(f"stages/{name}/done.json", {"config_hash": h, "started": 1000.0 + i, "ended": 1000.5 + i})
    return uri


# ----------------------------------------------------------------------------- 1. the dry run predicts the re-runs

def test_dry_run_shows_downstream_reruns(tmp_path, capsys):
    uri = finished_tiny_store(tmp_path)
    rc, out, _ = cli(capsys, "speedrun", "--profile", "tiny", "--store", uri, "--dry-run")
    assert rc == 0 and set(dry_run_rows(out).values()) == {"done"}
    rc, out, _ = cli(capsys, "speedrun", "--profile", "tiny", "--store", uri, "--set", "base_train.num_iterations=400", "--dry-run")
    rows = dry_run_rows(out)
    assert rc == 0 and rows["base_train"] == "to run (config changed)"
    assert [n for n, st in rows.items() if st == "done"] == ["data", "tok_train", "tok_eval"]
    assert rows["base_eval"] == "to run (upstream base_train re-runs)" and rows["chat_eval_rl"] == "to run (upstream chat_rl re-runs)"
    rc, out, _ = cli(capsys, "speedrun", "--profile", "tiny", "--store", uri, "--set", "chat_rl.task=synthetic_mc", "--dry-run")
    rows = dry_run_rows(out)
    assert {n: st for n, st in rows.items() if st != "done"} == {"chat_rl": "to run (config changed)",
                                                               "chat_eval_rl": "to run (upstream chat_rl re-runs)"}


# ----------------------------------------------------------------------------- 2. --set KEY=VALUE

def test_bare_set_key_applies_to_the_stages_that_have_it(tmp_path, capsys):
    rc, out, err = cli(capsys, "speedrun", "--profile", "tiny", "--store", f"file://{tmp_path / 'st'}", "--set", "compile=false", "--dry-run")
    assert rc == 0, err
    args = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "--compile=false" in args["base_train"] and "--compile=false" in args["mid_train"]
    assert "--compile" not in args["data"] and "--compile" not in args["tok_train"]


def test_bare_set_key_no_stage_has_is_one_line(tmp_path, capsys):
    rc, _, err = cli(capsys, "speedrun", "--profile", "tiny", "--store", f"file://{tmp_path / 'st'}", "--set", "compiel=false", "--dry-run")
    assert rc == 2
    assert error_lines(err) == [err.strip()] and "no stage in this run has --compiel" in err and "STAGE.compiel=false" in err


@pytest.mark.parametrize("depth", ["129", "9" * 40])
def test_a_depth_past_the_bound_is_one_line_before_anything_is_built(tmp_path, capsys, monkeypatch, depth):
    """d20's dry run plans base_train's model (layers on the meta device): a 40-digit depth planned layers until the
    machine ran out of memory (found by tests/faults/test_hostile_input.py, 22 GB and the OOM killer)."""
    monkeypatch.setattr("nanochat.cli.visible_gpus", lambda: 8)
    rc, _, err = cli(capsys, "speedrun", "--profile", "d20", "--store", f"file://{tmp_path}/s", "--set", f"base_train.depth={depth}", "--dry-run")
    assert rc == 2 and error_lines(err) == [f"nanochat: error: stage base_train: --depth must be <= 128 (the speedrun's models are 4 to "
                                            f"32 layers), got {depth}"], err


def test_speedrun_help_says_what_a_bare_key_does_and_shows_defaults(capsys):
    rc, out, _ = cli(capsys, "speedrun", "--help")
    text = " ".join(out.split())
    assert rc == 0 and "a bare KEY=VALUE applies to every stage that has --KEY" in text
    assert "retries per failed stage; each run of this command gets them all afresh (default: 1)" in text and "(default: auto)" in text


# ----------------------------------------------------------------------------- 3. nanochat data flags

@pytest.mark.parametrize("argv, says", [
    (["recipe", "--depth", "abc"], "argument --depth: expected an integer > 0, got 'abc'"),
    (["recipe", "--depth", "20,0"], "argument --depth: expected an integer > 0, got '0'"),
    (["recipe", "--depth", "20,129"], "argument --depth: a depth must be <= 128, got 129"),
    (["recipe", "--gpus", "0"], "argument --gpus: expected an integer > 0, got '0'"),
    (["recipe", "--mfu", "x"], "argument --mfu: expected a number in (0, 1], got 'x'"),
    (["download", "--workers", "0"], "argument --workers: expected an integer > 0, got '0'"),
    (["embedded", "--synthetic-fraction", "1"], "argument --synthetic-fraction: expected a number in [0, 1), got '1'"),
])
def test_bad_data_flag_is_one_argparse_error(capsys, argv, says):
    rc, _, err = cli(capsys, "data", *argv)
    assert rc == 2 and "Traceback" not in err
    assert error_lines(err) == [f"nanochat data {argv[0]}: error: {says}"]


def test_data_help_shows_defaults(capsys):
    assert cli(capsys, "data", "recipe", "--depth", "12,20")[0] == 0
    for argv, shown in [(["recipe"], ["(20,24,26) (default: 20)", "estimate (default: 8)", "(default: 32768)"]),
                        (["download"], ["parallel downloads (default: 8)", "(default: fineweb-edu)"]),
                        (["embedded"], ["(0 = all) (default: 0)"])]:
        rc, out, _ = cli(capsys, "data", *argv, "--help")
        text = " ".join(out.split())
        assert rc == 0 and all(s in text for s in shown), text
        assert "(default: None)" not in text and "(default: False)" not in text


# ----------------------------------------------------------------------------- 4. stores without a run

def test_report_status_dry_run_on_a_missing_store_create_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nope"
    rc, out, err = cli(capsys, "report", "--store", f"file://{missing}")
    assert rc == 1 and out == "" and error_lines(err) == [err.strip()]
    assert f"no run at file://{missing} (no such folder)" in err and "speedrun --store" in err
    assert not (tmp_path / "report.md").exists()
    rc, out, _ = cli(capsys, "status", "--store", f"file://{missing}")
    assert rc == 0 and out.startswith(f"no run at file://{missing} (no such folder)") and len(out.splitlines()) == 1
    rc, out, err = cli(capsys, "speedrun", "--profile", "tiny", "--store", f"file://{missing}", "--dry-run")
    assert rc == 0 and f"no run at file://{missing} yet (no such folder)" in err
    assert set(dry_run_rows(out).values()) == {"to run (not run yet)"}
    assert not missing.exists() and not (tmp_path / "nanochat-base" / "logs").exists()


def test_report_on_a_store_with_no_stages_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "report", "--store", str(tmp_path / "empty"))
    assert rc == 1 and "(no stages/ in it)" in err and not (tmp_path / "report.md").exists()
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("uri, fixed", [("s3//bucket/run", "s3://bucket/run"), ("file//tmp/x", "file:///tmp/x"), ("s3:bucket", "s3://bucket")])
@pytest.mark.parametrize("cmd", [["status"], ["report"], ["speedrun", "--dry-run"]])
def test_mistyped_scheme_is_rejected_before_a_folder_appears(tmp_path, capsys, monkeypatch, uri, fixed, cmd):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, *cmd, "--store", uri)
    assert rc == 2 and err.strip() == f"nanochat: error: store URI {uri!r} has a mistyped scheme; did you mean {fixed!r}?"
    assert {p.name for p in tmp_path.iterdir()} <= {"tmp", "nanochat-base"}  # no ./s3/ or ./file/


def test_s3_without_scheme_is_rejected_unless_the_folder_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "status", "--store", "s3/bucket/run")
    assert rc == 2 and "did you mean 's3://bucket/run'? (write './s3/bucket/run' for a local folder)" in err
    assert not (tmp_path / "s3").exists()
    (tmp_path / "s3" / "bucket" / "run").mkdir(parents=True)  # an existing local folder is taken as asked
    rc, out, _ = cli(capsys, "status", "--store", "s3/bucket/run")
    assert rc == 0 and out.startswith("no run at s3/bucket/run")


def test_version_names_the_package_torch_and_python(capsys):
    import platform
    import tomllib

    import torch

    from operators.cli import main as k8s_main
    package = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    rc, out, _ = cli(capsys, "--version")
    assert rc == 0 and out.strip() == (f"nanochat-k8s {package} (torch {torch.__version__}, "
                                       f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'}, "
                                       f"Python {platform.python_version()})")
    with pytest.raises(SystemExit) as e:
        k8s_main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nanochat-k8s {package} (NanochatRun nanochat.dev/v1alpha1)"


# ----------------------------------------------------------------------------- GPU profiles fit this machine's GPUs

def dry_run_nprocs(out: str) -> dict[str, int]:
    return {line.split()[0]: int(line.split(" nproc=")[1].split()[0]) for line in out.splitlines() if line.startswith("  ")}


@pytest.mark.parametrize("gpus, nproc_flag, expected", [(8, None, 8), (1, None, 1), (6, None, 4), (8, "2", 2)])
def test_gpu_stages_run_one_process_per_gpu_this_machine_has(tmp_path, capsys, monkeypatch, gpus, nproc_flag, expected):
    """d20 is sized for 8 GPUs; on fewer, each GPU stage runs one process per GPU it can split the batch over (6 GPUs: 4;
    gradient accumulation keeps the batch) instead of torchrun asking for GPUs that are not there; --nproc picks fewer."""
    monkeypatch.setattr("nanochat.cli.visible_gpus", lambda: gpus)
    argv = ["speedrun", "--profile", "d20", "--store", f"file://{tmp_path}/s", "--dry-run"] + (["--nproc", nproc_flag] if nproc_flag else [])
    rc, out, err = cli(capsys, *argv)
    rows = dry_run_nprocs(out)
    assert rc == 0 and rows["base_train"] == rows["chat_sft"] == rows["chat_eval_sft"] == expected, out
    assert rows["data"] == rows["tok_train"] == 1
    assert ("gradient accumulation keeps the batch" in err) == (gpus < 8 and nproc_flag is None), err
    assert f"base_train on {expected} GPU" in err  # the budget counts the GPUs that will run


@pytest.mark.parametrize("argv, gpus, message", [
    ([], 0, "torch sees no CUDA GPU here"),
    (["--nproc", "16"], 8, "--nproc 16: this machine has 8 CUDA GPU(s)"),
    (["--nproc", "0"], 8, "--nproc: expected a positive number"),
])
def test_a_gpu_profile_this_machine_cannot_run_is_refused_before_anything(tmp_path, capsys, monkeypatch, argv, gpus, message):
    monkeypatch.setattr("nanochat.cli.visible_gpus", lambda: gpus)
    rc, _, err = cli(capsys, "speedrun", "--profile", "d20", "--store", f"file://{tmp_path}/s", *argv)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "s").exists()


def test_no_gpu_dry_run_previews_and_warns(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("nanochat.cli.visible_gpus", lambda: 0)
    rc, out, err = cli(capsys, "speedrun", "--profile", "d20", "--store", f"file://{tmp_path}/s", "--dry-run")
    assert rc == 0 and dry_run_nprocs(out)["base_train"] == 8 and "a real run would stop here" in err


def test_a_batch_that_does_not_split_over_the_processes_is_found_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    """--nproc 3 on d20: base_train's 524,288-token batch cannot split over 3 processes; said by the plan, not by
    base_train after the download and the tokenizer."""
    monkeypatch.setattr("nanochat.cli.visible_gpus", lambda: 8)
    rc, _, err = cli(capsys, "speedrun", "--profile", "d20", "--store", f"file://{tmp_path}/s", "--nproc", "3", "--dry-run")
    assert rc == 2 and error_lines(err)[-1] == ("nanochat: error: stage base_train: --total-batch-size 524288 must be a multiple of "
                                                "device_batch_size × max_seq_len × processes (32 × 2048 × 3 = 196608)"), err
    rc, _, err = cli(capsys, "speedrun", "--profile", "d20", "--store", f"file://{tmp_path}/s", "--nproc", "4", "--dry-run")
    assert rc == 0, err
