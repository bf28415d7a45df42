"""`nanochat serve` / `nanochat chat` when the model cannot be loaded: a missing step, a corrupted checkpoint, a device
this machine lacks. Each is one `nanochat: error:` line and a non-zero exit, never a traceback or a server without a
model; and every flag's --help says its default."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import chat_cli, serve
from nanochat.store import open_store
from tests.fixtures import make_base_checkpoint, make_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    uri = f"file://{tmp_path_factory.mktemp('load')}/store"
    store = open_store(uri)
    tokenizer = make_tokenizer(store)
    tokenizer.save(store)
    make_base_checkpoint(store, tokenizer)  # base_train step 1
    return uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nanochat(*args, timeout=90):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nanochat.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_with_a_missing_step_exits_with_one_line(store_uri):
    r = nanochat("serve", "--store", store_uri, "-i", "base", "--step", "123", "--port", str(free_port()))
    assert r.returncode == 1
    assert r.stderr == f"nanochat: error: no checkpoint step 123 under {store_uri}/checkpoints/base_train/: available steps 1\n"


@pytest.mark.parametrize("device, says", [("foo", "unknown device 'foo'"), ("cuda:99", "cuda:99"),
                                          ("cuda", None if torch.cuda.is_available() else "--device cuda: no CUDA device is available")])
def test_serve_on_an_unusable_device_is_a_usage_error(store_uri, device, says):
    if says is None:
        pytest.skip("this machine has a GPU")
    r = nanochat("serve", "--store", store_uri, "--device", device, "--port", str(free_port()))
    assert r.returncode == 2 and r.stderr.startswith("nanochat: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert says in r.stderr and "--num-workers" not in r.stderr and "checkpoint" not in r.stderr


def test_serve_exits_when_the_model_fails_to_load_in_the_background(store_uri, tmp_path):
    """The step exists (so the quick check passes) but its weights are corrupted: the background load fails, and the
    process stops with a non-zero status instead of serving 503s forever."""
    uri = f"file://{tmp_path}/store"
    src, dst = open_store(store_uri), open_store(uri)
    for key in src.list(""):
        dst.put_bytes(key, src.get_bytes(key))
    dst.put_bytes("checkpoints/base_train/000001/model.pt", b"torn")
    r = nanochat("serve", "--store", uri, "-i", "base", "--step", "1", "--port", str(free_port()), timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == (f"nanochat: error: the model did not load: StoreError: checkpoint {uri}/checkpoints/"
                                         "base_train/000001 is torn or corrupted (see the warning above); other steps: none")
    assert "trying an older one" not in r.stderr and "Application startup complete" in r.stderr


def test_chat_with_a_missing_step_exits_with_one_line(store_uri):
    r = nanochat("chat", "--store", store_uri, "-i", "base", "-s", "99999", "-p", "hi")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"nanochat: error: no checkpoint step 99999 under {store_uri}/checkpoints/base_train/: available steps 1\n"


@pytest.mark.parametrize("module, defaults", [
    (serve, ["--port PORT .*\\(default: 8000\\)", "--host HOST .*\\(default: 127.0.0.1\\)", "\\(default: 64\\)",
             "\\(default: 30\\)", "\\(default: info\\)", "\\(default: 8; 1: one request"]),
    (chat_cli, ["\\(default: 42\\)", "\\(default: 0.6\\)", "\\(default: 50\\)", "\\(default: 512\\)"])])
def test_every_flag_has_help_and_shows_its_default(module, defaults, monkeypatch):
    import re
    monkeypatch.setenv("NANOCHAT_API_KEY", "sk-secret-key")
    monkeypatch.setenv("COLUMNS", "200")  # one line per flag
    parser = module.build_parser()
    text = parser.format_help()
    for pattern in defaults:
        assert re.search(pattern, text), pattern
    assert "sk-secret-key" not in text  # --api-key's default comes from the environment: never printed
    assert [a.dest for a in parser._actions if not a.help] == []


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_a_bad_decode_mode_in_the_environment_is_one_line(store_uri, command, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DECODE", "foo")
    extra = ["-p", "hi"] if command == "chat" else ["--port", str(free_port())]
    r = nanochat(command, "--store", store_uri, "-i", "base", *extra)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "nanochat: error: NANOCHAT_DECODE='foo': use one of auto, eager, static, graph, compile, fused"
