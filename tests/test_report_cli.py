"""Report generation, metrics endpoint and the `nanochat` CLI surface (help, status, report, errors)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from nanochat.report import Report, report_card
from nanochat.stage import stage_main
from nanochat.store import open_store
from tests.fake_stages import echo
from tests.s3util import free_port


def nanochat(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "nanochat.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def run_echo(uri, *flags):
    return stage_main("echo", echo.Config, echo.run, [f"--store={uri}", *flags])


def test_stage_contract_in_process(store_uri):
    assert run_echo(store_uri, "--label=base", "--value=7", "--steps=3") == 0
    store = open_store(store_uri)
    done = store.get_json("stages/echo_base/done.json")
    assert done["config"]["value"] == 7 and done["card"] == {"column": "BASE", "values": {"score": 0.7}}
    assert done["duration_s"] >= 0 and done["world_size"] == 1 and len(done["config_hash"]) == 16
    assert [r["step"] for r in __import__("nanochat.report", fromlist=["x"]).load_history(store, "echo_base")] == [1, 2, 3]
    # same config: skipped without executing
    assert run_echo(store_uri, "--label=base", "--value=7", "--steps=3") == 0
    assert len(store.list("test/echo_base/executions/")) == 1
    assert run_echo(store_uri, "--label=base", "--value=7", "--steps=3", "--force") == 0
    assert len(store.list("test/echo_base/executions/")) == 2


def test_report_has_sections_card_and_plots(store_uri):
    store = open_store(store_uri)
    Report(store).reset(extra={"profile": "test"})
    for label, value in [("base", 2), ("mid", 4), ("sft", 6), ("rl", 8)]:
        assert run_echo(store_uri, f"--label={label}", f"--value={value}", "--steps=4") == 0
    text = Report(store).generate(stage_order=["echo_base", "echo_mid", "echo_sft", "echo_rl"])
    assert text.startswith("# nanochat report card")
    for header in ("git commit", "torch", "dependencies installed", "total wall time", "## Summary", "## Stage timings"):
        assert header in text
    assert "| Metric | BASE | MID | SFT | RL |" in text
    assert "| score | 0.2000 | 0.4000 | 0.6000 | 0.8000 |" in text
    positions = [text.index(f"## Echo echo_{n}") for n in ("base", "mid", "sft", "rl")]
    assert positions == sorted(positions)
    figures = store.list("report/figures/")
    assert {"report/figures/loss_curves.png", "report/figures/throughput.png"} <= set(figures)
    assert store.get_bytes("report/figures/loss_curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![loss_curves](figures/loss_curves.png)" in text
    assert store.get_bytes("report/report.md").decode() == text


def test_report_card_table_from_markers():
    card = report_card({"a": {"card": {"column": "SFT", "values": {"acc": 0.5}}}, "b": {"card": {"column": "BASE", "values": {"acc": 0.1, "bpb": 1.2}}}})
    assert card.splitlines()[0] == "| Metric | BASE | SFT |"
    assert "| bpb | 1.2000 | - |" in card


def test_metrics_endpoint_while_running(tmp_path):
    port = free_port()
    uri = f"file://{tmp_path}/st"
    seen = {}

    def scrape():
        for _ in range(200):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
                if 'nanochat_stage_step{rank="0",stage="echo"}' in body and "nanochat_stage_loss" in body:
                    seen["body"] = body
                    return
            except OSError:
                pass
            time.sleep(0.05)
    t = threading.Thread(target=scrape)
    t.start()
    assert run_echo(uri, f"--metrics-port={port}", "--steps=20", "--step-s=0.1") == 0
    t.join()
    assert "nanochat_stage_running" in seen["body"] and "nanochat_stage_tokens_per_second" in seen["body"]
    with pytest.raises(OSError):  # the endpoint is gone after the stage ends
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_cli_help_status_report(tmp_path):
    out = nanochat("--help")
    assert out.returncode == 0 and "speedrun" in out.stdout and "status" in out.stdout
    uri = f"file://{tmp_path}/st"
    empty = nanochat("status", "--store", uri)
    assert empty.returncode == 0 and empty.stdout.startswith(f"no run at {uri} (no such folder)")
    assert not (tmp_path / "st").exists()  # looking does not create the store
    assert run_echo(uri, "--label=base", "--steps=2") == 0
    st = nanochat("status", "--store", uri)
    assert st.returncode == 0 and "echo_base" in st.stdout and "succeeded" in st.stdout
    rep = subprocess.run([sys.executable, "-m", "nanochat.cli", "report", "--store", uri], capture_output=True, text=True, cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    local = (tmp_path / "report.md").read_text()
    assert "## Echo echo_base" in local and "](report_figures/loss_curves.png)" in local
    assert (tmp_path / "report_figures" / "loss_curves.png").exists()


@pytest.mark.parametrize("args, message", [
    (["speedrun", "--profile", "nope"], "unknown profile 'nope'"),
    (["speedrun", "--store", "gs://bucket/x"], "unsupported store URI"),
    (["speedrun", "--store", "s3//bucket/x"], "mistyped scheme; did you mean 's3://bucket/x'?"),
    (["stage", "nope"], "unknown stage 'nope'"),
    (["speedrun", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_bad_input_is_one_clear_line(args, message):
    out = nanochat(*args)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("usage:") and line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_unreachable_s3_store_is_one_clear_line(tmp_path):
    env = {**__import__("os").environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    out = subprocess.run([sys.executable, "-m", "tests.fake_stages.echo", "--store=s3://bucket/run"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip().splitlines()[-1]]
    assert "store unusable" in out.stderr and "s3://bucket/run" in out.stderr


def test_the_printed_command_is_one_the_user_can_type(monkeypatch, tmp_path):
    """After `make speedrun` the venv is not on PATH: the hint names .venv/bin/nanochat, relative to where they are."""
    from pathlib import Path
    from nanochat.cli import command_name
    monkeypatch.setenv("PATH", str(tmp_path))  # no nanochat on PATH
    name = command_name()
    assert name != "nanochat" and Path(name).name == "nanochat" and Path(name).exists()
    (tmp_path / "nanochat").write_text("#!/bin/sh\n")
    (tmp_path / "nanochat").chmod(0o755)
    assert command_name() == "nanochat"


ABORTING_STAGE = """
import os
from tests.fake_stages import echo
from nanochat.stage import run_module_main
def crash_in_native_code(ctx):
    os.abort()
run_module_main("echo", echo.Config, crash_in_native_code)
"""


def test_a_native_crash_prints_the_python_stack(tmp_path):
    """A stage killed by a native abort (NCCL, pyarrow at exit) says where it was, not just 'exit -6'."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    proc = subprocess.run([sys.executable, "-c", ABORTING_STAGE, f"--store=file://{tmp_path}/s"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == -6, proc.stderr[-2000:]
    assert "Fatal Python error: Aborted" in proc.stderr and "crash_in_native_code" in proc.stderr, proc.stderr[-2000:]
