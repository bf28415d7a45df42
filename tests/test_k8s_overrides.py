"""Configuration errors on the Kubernetes path fail in one line before any work, as `nanochat speedrun` does:
bad stage overrides (render, validate), manifests without apiVersion/kind, a file:// store in pods."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from operators import crd, validate
from operators.pytorchjob import SpecError, container_env, plan_steps, render_run, stage_args, stage_configs

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, prog=("-m", "operators.cli")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *prog, *args], cwd=REPO, capture_output=True, text=True, timeout=180)


def in_process(main, argv, capsys) -> subprocess.CompletedProcess:
    """A CLI's main() in this process (its parse and checks, no interpreter start), as a finished process."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, rc, out, err)


def local_error(tmp_path, capsys, *sets) -> str:
    """The local path's one-line error: `nanochat speedrun --dry-run --set ...` (validates every stage, runs none)."""
    from nanochat.cli import main
    argv = ["speedrun", "--dry-run", "--profile", "tiny", "--store", f"file://{tmp_path / 'local'}"]
    for s in sets:
        argv += ["--set", s]
    p = in_process(main, argv, capsys)
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
def test_render_rejects_bad_overrides_with_the_local_error(tmp_path, capsys, sets, culprit, says):
    from operators.cli import main
    out = tmp_path / "jobs"
    argv = ["render", "--profile", "tiny", "--image", "img:1", "--store", "s3://b/run", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    line = one_line(in_process(main, argv, capsys))
    local = local_error(tmp_path, capsys, *sets)
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


@pytest.mark.parametrize("env, expect", [
    ([{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NANOCHAT_DEPTH", "value": "deep"}],
     "spec.env[1] NANOCHAT_DEPTH='deep': stage data: --depth: expected an integer, got 'deep'"),
    ([{"name": "NANOCHAT_METRICS_PORT", "value": "9100"}],
     "spec.env[0] NANOCHAT_METRICS_PORT: set by the operator from spec.metricsPort; set that instead"),
    ([{"name": "AWS_ACCESS_KEY_ID", "value": "AKIA"}],
     "spec.env[0] AWS_ACCESS_KEY_ID: set by the operator from spec.store.secretName; set that instead"),
    ([{"name": "NANOCHAT_CONFIG", "value": "/etc/x.yaml"}],
     "spec.env[0] NANOCHAT_CONFIG: config files do not reach the pods; use spec.overrides"),
])
def test_env_is_checked_like_the_pods_will_read_it(env, expect):
    errors = validate.nanochatrun_errors(bad_run([], env=env))
    assert errors == [expect], errors
    with pytest.raises(SpecError, match="spec.env"):
        render_run(bad_run([], env=env))


def test_nanochat_env_counts_in_the_config_hash_as_in_the_pod():
    """A pod reads NANOCHAT_DEPTH as the config layer below its flags; the operator's expected hash must
    agree with the marker the pod writes, or the stage would re-run forever."""
    from nanochat.runner import plan_step
    spec = crd.apply_defaults(bad_run([], env=[{"name": "NANOCHAT_DEPTH", "value": "3"}])["spec"])
    steps = plan_steps(spec)
    train = next(s for s in steps if s.module == "base_train")
    pod_env = {e["name"]: e["value"] for e in container_env(spec) if "value" in e}
    in_pod = plan_step(train, stage_args(train, spec, {}), env=pod_env)
    by_operator = {step.name: (name, h) for step, name, h in stage_configs(spec, steps)}
    assert by_operator[train.name] == in_pod
    plain = {step.name: h for step, _, h in stage_configs({**spec, "env": []}, steps)}
    assert plain[train.name] != in_pod[1]  # the variable did change the config


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


@pytest.mark.parametrize("gpus, expect", [
    (3, "stage base_train (spec.resources: 3 processes): --total-batch-size 524288 must be a multiple of device_batch_size × "
        "max_seq_len × processes (32 × 2048 × 3 = 196608)"),
    (4, None),
])
def test_a_batch_that_does_not_split_over_the_pods_processes_is_rejected(gpus, expect):
    """gpusPerNode × nodes is each training stage's world size: a batch it cannot split is refused at validate time,
    not by base_train's pod after the data and tokenizer stages ran."""
    run = crd.example("split", profile="d20", store="s3://b/runs/split")
    run["spec"]["resources"] = {"gpu": {"gpusPerNode": gpus}}
    errors = validate.nanochatrun_errors(run)
    assert (expect in errors[0]) if expect else errors == [], errors
