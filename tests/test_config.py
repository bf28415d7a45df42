"""Config layering: defaults < profile < config file < NANOCHAT_* env < flags; errors before any work."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nanochat import profiles
from nanochat.config import ConfigError, config_hash, parse_config
from tests.fake_stages.echo import Config


@pytest.fixture
def echo_profile(monkeypatch):
    monkeypatch.setitem(profiles.PROFILES, "testprof", {"description": "t", "common": {"seed": 7}, "stages": {"echo": {"value": 2, "steps": 9}}, "nproc": {}})


def test_defaults():
    cfg = parse_config(Config, [], "echo", env={})
    assert (cfg.value, cfg.steps, cfg.profile, cfg.seed) == (1, 5, "tiny", 42)


def test_precedence_profile_file_env_flags(tmp_path, echo_profile):
    cfg = parse_config(Config, ["--profile=testprof"], "echo", env={})
    assert (cfg.value, cfg.steps, cfg.seed) == (2, 9, 7)
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\necho:\n  value: 4\nbase_train:\n  depth: 99\n")
    cfg = parse_config(Config, ["--profile", "testprof", "--config", str(f)], "echo", env={})
    assert (cfg.value, cfg.steps, cfg.seed) == (4, 9, 3)  # other stages' sections are ignored
    cfg = parse_config(Config, ["--profile=testprof", f"--config={f}"], "echo", env={"NANOCHAT_VALUE": "5"})
    assert cfg.value == 5
    cfg = parse_config(Config, ["--profile=testprof", f"--config={f}", "--value", "6"], "echo", env={"NANOCHAT_VALUE": "5"})
    assert cfg.value == 6
    cfg = parse_config(Config, ["--value=8", "--step_s=0.5"], "echo", env={"NANOCHAT_PROFILE": "testprof"})
    assert (cfg.value, cfg.steps, cfg.step_s, cfg.profile) == (8, 9, 0.5, "testprof")


def test_json_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"echo": {"steps": 3}}))
    assert parse_config(Config, [f"--config={f}"], "echo", env={}).steps == 3


def test_bool_forms():
    assert parse_config(Config, ["--force"], "echo", env={}).force is True
    assert parse_config(Config, ["--force=false"], "echo", env={}).force is False
    assert parse_config(Config, ["--no-force"], "echo", env={"NANOCHAT_FORCE": "1"}).force is False
    assert parse_config(Config, [], "echo", env={"NANOCHAT_FORCE": "yes"}).force is True


@pytest.mark.parametrize("argv, env, message", [
    (["--valu=3"], {}, r"unknown key --valu for stage echo \(did you mean --value\?\)"),
    (["--value=abc"], {}, r"--value: expected an integer, got 'abc'"),
    (["--step-s=fast"], {}, r"--step-s: expected a number"),
    (["--force=maybe"], {}, r"--force: expected a boolean"),
    ([], {"NANOCHAT_STEPS": "x"}, r"--steps: expected an integer"),
    (["--dtype=int8"], {}, r"--dtype: 'int8' is not one of: auto, float32"),
    (["--profile=nope"], {}, r"--profile: unknown profile 'nope'; accepted: tiny"),
    (["--steps=-1"], {}, r"--steps must be >= 0"),
    (["positional"], {}, r"unexpected argument 'positional'"),
    (["--config=/does/not/exist.yaml"], {}, r"--config: file not found"),
])
def test_errors_name_the_key(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Config, argv, "echo", env=env)


def test_config_file_errors(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("echo:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="unknown key --nope in section 'echo'"):
        parse_config(Config, [f"--config={f}"], "echo", env={})
    f.write_text("wat: 1\n")
    with pytest.raises(ConfigError, match="unknown key --wat at the top level"):
        parse_config(Config, [f"--config={f}"], "echo", env={})
    f.write_text("echo: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_config(Config, [f"--config={f}"], "echo", env={})


def test_hash_ignores_ports_and_store():
    a = parse_config(Config, ["--metrics-port=9100", "--store=file:///a"], "echo", env={})
    b = parse_config(Config, ["--store=file:///b"], "echo", env={})
    c = parse_config(Config, ["--value=2"], "echo", env={})
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_help_and_bad_flag_through_the_module():
    out = subprocess.run([sys.executable, "-m", "tests.fake_stages.echo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--value" in out.stdout and "value written to the output" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "tests.fake_stages.echo", "--bogus=1"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "nanochat stage echo: error: unknown key --bogus for stage echo; run with --help to list the accepted keys"
    assert len(bad.stderr.strip().splitlines()) == 1


def test_every_profile_key_is_a_real_flag():
    """Profiles are data: each key they set must exist in that stage's Config (for stages that exist)."""
    import importlib
    from nanochat.pipeline import MODULES, module_exists
    for name, prof in profiles.PROFILES.items():
        for stage, keys in prof.get("stages", {}).items():
            assert stage in MODULES, f"profile {name} configures unknown stage {stage}"
            if not module_exists(stage):
                continue
            fields = importlib.import_module(f"nanochat.stages.{stage}").Config.__dataclass_fields__
            unknown = set(keys) - set(fields)
            assert not unknown, f"profile {name}, stage {stage}: unknown keys {unknown}"
        for stage in prof.get("nproc", {}):
            assert stage in MODULES


def test_logging_follows_sys_stderr_after_the_stream_it_started_on_closes(monkeypatch):
    """A stage run in-process under one captured stderr must not leave logging bound to that stream once it closes."""
    import io
    import logging

    from nanochat import common
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    common.setup_logging()
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    monkeypatch.setattr(logging, "raiseExceptions", True)
    logging.getLogger("nanochat.test").info("after the swap")
    assert "after the swap" in second.getvalue()
    assert "Logging error" not in second.getvalue()


def test_stage_help_keeps_the_docstrings_example_lines():
    out = subprocess.run([sys.executable, "-m", "nanochat.stages.chat_eval", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    example = "    nanochat stage chat_eval --source=sft -a 'ARC-Easy|GSM8K' --max-problems=100"
    assert example in out.stdout.splitlines()  # on its own line, not run into the paragraph
    options = out.stdout[out.stdout.index("options:"):]
    store_help = options[options.index("--store"):options.index("--profile")]
    assert store_help.count("(default:") == 1
