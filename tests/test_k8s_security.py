"""Stage pods run with a read-only root filesystem (operators.pytorchjob.CONTAINER_SECURITY_CONTEXT).

The real stages run under exactly the environment a rendered pod gets, in a mount namespace where
/ is read-only and /tmp is a fresh directory (the pod's /tmp emptyDir), against S3 on loopback (moto):
a write anywhere but /tmp, /dev/shm and the store fails them, as it would in the cluster.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.store import open_store
from operators.pytorchjob import new_run, render_run
from tests.conftest import S3_ENV, make_bucket

REPO = Path(__file__).resolve().parents[1]
# in the new mount namespace: the emptyDir on /tmp, then the root read-only, then the container command
POD_MOUNTS = 'mount --rbind "$0" /tmp && mount -o remount,bind,ro / && exec "$@"'


def code_under_tmp() -> list[Path]:
    """The checkout and the venv when they live under /tmp (a clone in /tmp): the emptyDir would hide them."""
    paths = sorted(p for p in {REPO, Path(sys.prefix).resolve()} if p.is_relative_to("/tmp"))
    return [p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)]


def pod_sandbox(empty_dir: Path) -> list[str]:
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:  # unprivileged: a user namespace where we may mount
        unshare.insert(1, "--map-root-user")
    binds = ""
    for path in code_under_tmp():  # the image's code is in the image, not in /tmp: keep it visible in the emptyDir
        inside = empty_dir / path.relative_to("/tmp")
        inside.mkdir(parents=True, exist_ok=True)
        binds += f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(inside))} && "
    return [*unshare, "sh", "-c", binds + POD_MOUNTS, str(empty_dir)]


@pytest.fixture
def sandbox(tmp_path):
    """pod_sandbox, once shown to work here: the root is read-only and /tmp writable inside it."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    p = subprocess.run([*pod_sandbox(probe), "sh", "-c", "touch /tmp/ok && ! touch /nanochat-ro-probe"],
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0 or not (probe / "ok").exists():
        pytest.skip(f"mount namespaces are not available here: {p.stderr.strip()[:300]}")
    assert "Read-only file system" in p.stderr  # the control: writing outside /tmp fails
    return pod_sandbox


def pod_env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet sets it (the Secret's keys come from the test's S3 env)."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.pop("NANOCHAT_METRICS_PORT")  # pods have their own network namespace; parallel tests do not
    env.update(S3_ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin", PYTHONPATH=str(REPO))
    return env


def stage_containers(spec: dict) -> dict[str, dict]:
    return {step.name: job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
            for step, job in render_run(new_run("ro", spec))}


def test_stages_run_with_a_read_only_root_filesystem(sandbox, s3_env, tmp_path):
    uri = f"s3://{make_bucket(s3_env.url)}/run"
    containers = stage_containers({"profile": "ci", "image": "img", "store": {"uri": uri, "endpoint": s3_env.url},
                                   "stages": {"only": ["data", "tok_train"]}})
    assert list(containers) == ["data", "tok_train"]
    for name, c in containers.items():
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        empty_dir = tmp_path / f"emptydir-{name}"
        empty_dir.mkdir()
        p = subprocess.run([*sandbox(empty_dir), *c["command"], *c["args"]], env=pod_env(c), cwd="/",
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{name}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    store = open_store(uri)
    assert store.exists("stages/data/done.json") and store.exists("stages/tok_train/done.json")


def test_torch_compile_caches_go_to_the_tmp_empty_dir(sandbox, tmp_path):
    """torch.compile (inductor's C++ build on CPU; triton's cache on GPUs) under a GPU stage's environment."""
    c = stage_containers({"profile": "d20", "image": "img", "store": {"uri": "s3://b/r"},
                          "stages": {"only": ["base_train"]}})["base_train"]
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    code = "import torch; f = torch.compile(lambda x: x.sin() + 1); assert f(torch.zeros(4)).sum().item() == 4"
    p = subprocess.run([*sandbox(empty_dir), sys.executable, "-c", code], env=pod_env(c), cwd="/",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert any((empty_dir / "torchinductor").iterdir())  # TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
