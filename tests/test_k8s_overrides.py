"""Configuration errors on the Kubernetes path fail in one line before any work, as `nanochat speedrun` does:
bad stage overrides (render, validate), manifests without apiVersion/kind, a file:// store in pods."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from operators import crd, validate

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, prog=("-m", "operators.cli")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *prog, *args], cwd=REPO, capture_output=True, text=True, timeout=180)


def local_error(tmp_path, *sets) -> str:
    """The local path's one-line error: `nanochat speedrun --dry-run --set ...` (validates every stage, runs none)."""
    argv = ["speedrun", "--dry-run", "--profile", "tiny", "--store", f"file://{tmp_path / 'local'}"]
    for s in sets:
        argv += ["--set", s]
    p = run_cli(*argv, prog=("-c", "import sys; from nanochat.cli import main; sys.exit(main())"))
    assert p.returncode == 2 and p.stderr.startswith("nanochat: error: stage "), p.stderr
    return p.stderr.strip().removeprefix("nanochat: error: ")


def one_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout == "" and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def bad_run(overrides, **spec) -> dict:
    run = crd.example("bad", profile="tiny", store="s3://b/runs/bad")
    run["spec"].update(overrides=overrides, **spec)
    return run


# ----------------------------------------------------------------------------- render --set

@pytest.mark.parametrize("sets, culprit, says", [
    (["base_train.nosuch=1", "base_train.depth=abc"], "base_train.nosuch=1", "unknown key --nosuch for stage base_train"),
    (["base_train.dept=4"], "base_train.dept=4", "(did you mean --depth?)"),
    (["seed=3", "base_train.depth=abc"], "base_train.depth=abc", "--depth: expected an integer, got 'abc'"),
])
def test_render_rejects_bad_overrides_with_the_local_error(tmp_path, sets, culprit, says):
    out = tmp_path / "jobs"
    argv = ["render", "--profile", "tiny", "--image", "img:1", "--store", "s3://b/run", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    line = one_line(run_cli(*argv))
    local = local_error(tmp_path, *sets)
    assert says in local
    assert line == f"nanochat-k8s: error: --set {culprit!r}: {local}"
    assert not out.exists()  # nothing written


def test_render_from_a_file_names_the_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(bad_run(["seed=1", "base_train.depth=abc"])))
    line = one_line(run_cli("render", "-f", str(path)))
    assert line == ("nanochat-k8s: error: spec.overrides[1] 'base_train.depth=abc': "
                    "stage base_train: --depth: expected an integer, got 'abc'")


def test_good_overrides_still_render(tmp_path):
    p = run_cli("render", "--profile", "tiny", "--image", "img:1", "--store", "s3://b/run",
                "--set", "base_train.depth=2", "--set", "seed=5")
    assert p.returncode == 0, p.stderr
    jobs = {d["metadata"]["labels"]["nanochat.dev/stage"]: d for d in yaml.safe_load_all(p.stdout)}
    args = jobs["base_train"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert "--depth=2" in args and "--seed=5" in args


# ----------------------------------------------------------------------------- validate

def test_validate_rejects_a_run_with_a_bad_override(tmp_path):
    path = tmp_path / "run.yaml"
    good = bad_run(["base_train.depth=2"])
    path.write_text(yaml.safe_dump_all([good, bad_run(["base_train.nosuch=1"])]))
    p = run_cli("validate", str(path))
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout.splitlines()[0] == f"ok   {path}: NanochatRun bad"
    assert "FAIL" in p.stdout.splitlines()[1]
    assert ("spec.overrides[0] 'base_train.nosuch=1': stage base_train: unknown key --nosuch for stage base_train"
            in p.stdout.splitlines()[2])


@pytest.mark.parametrize("change, expect", [
    (dict(overrides=["chat_sft.num_iterations=x"]), "spec.overrides[0] 'chat_sft.num_iterations=x': stage chat_sft:"),
    (dict(overrides=["nope.depth=1"]), "unknown stage 'nope'"),
    (dict(overrides=[], stages={"only": ["base_trian"]}), "spec.stages.only: unknown step(s) base_trian"),
])
def test_nanochatrun_errors_include_what_the_stages_reject(change, expect):
    run = bad_run(**change)
    errors = validate.nanochatrun_errors(run)
    assert any(expect in e for e in errors), errors
    assert validate.nanochatrun_errors(run, stages=False) == []  # the schema alone accepts it
    with pytest.raises(validate.ValidationFailed):
        validate.check(run)


def test_stage_check_imports_no_stage_dependency():
    """The operator image need not have what stages use at run time: the check imports only their configs."""
    blocked = ["tokenizers", "safetensors", "triton", "rustbpe", "fastapi", "uvicorn", "pyarrow", "tiktoken", "matplotlib"]
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None  # importing any of them raises ImportError\n"
            "from operators import crd, validate\n"
            "run = crd.example('x', profile='d20')\n"
            "run['spec']['overrides'] = ['base_train.depth=abc']\n"
            "print(validate.nanochatrun_errors(run))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "--depth: expected an integer, got 'abc'" in p.stdout


# ----------------------------------------------------------------------------- manifests without apiVersion / kind

@pytest.mark.parametrize("doc, field", [
    ({"kind": "ConfigMap", "metadata": {"name": "x"}}, "apiVersion"),
    ({"apiVersion": "v1", "metadata": {"name": "x"}}, "kind"),
    ({"apiVersion": 1, "kind": "ConfigMap", "metadata": {"name": "x"}}, "apiVersion"),
])
def test_validate_names_the_file_and_the_missing_field(tmp_path, doc, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ok"}}, doc]))
    line = one_line(run_cli("validate", str(path)))
    assert line.startswith(f"nanochat-k8s: error: {path}: document 2: {field} is ")


# ----------------------------------------------------------------------------- file:// stores

def test_render_refuses_a_file_store_unless_allowed(tmp_path):
    base = ["render", "--profile", "tiny", "--image", "img:1", "--store", "file:///data/run"]
    line = one_line(run_cli(*base, "--out", str(tmp_path / "jobs")))
    assert line.startswith("nanochat-k8s: error: --store file:///data/run: each pod would write to its own ephemeral filesystem")
    assert "shared (ReadWriteMany) volume mounted at /data/run" in line and "--allow-file-store" in line
    assert not (tmp_path / "jobs").exists()

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(crd.example("f", profile="tiny", store="file:///data/run")))
    assert "spec.store.uri file:///data/run: each pod" in one_line(run_cli("render", "-f", str(path)))

    p = run_cli(*base, "--allow-file-store")
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith("nanochat-k8s: warning: --store file:///data/run:") and "shared" in p.stderr
    docs = list(yaml.safe_load_all(p.stdout))
    assert docs and all("--store=file:///data/run" in d["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
                        for d in docs)
