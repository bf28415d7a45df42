"""TorchX: components run stages for real on local_cwd; `-s kubernetes` dryruns are valid Volcano jobs;
our `pytorchjob` scheduler plugin (found through its entry point) renders valid PyTorchJobs and
submits / describes / deletes them against an in-memory Kubernetes API."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nanochat import pipeline
from nanochat.store import open_store
from operators import torchx_components as tc, validate
from operators.pytorchjob import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT
from operators.torchx_scheduler import PyTorchJobScheduler, app_to_pytorchjob, create_scheduler, Opts
from tests.test_k8s_operator import MockAPI

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = str(REPO / "operators" / "torchx_components.py")
VENV_BIN = str(Path(sys.executable).parent)


def torchx(*args, cwd, extra_path: str | None = None, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")  # torchrun from this venv
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(REPO), env.get("PYTHONPATH")) if p)
    p = subprocess.run([os.path.join(VENV_BIN, "torchx"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_local_cwd_runs_a_real_stage_component(tmp_path):
    """`torchx run -s local_cwd operators/torchx_components.py:data` runs nanochat's data stage under torchrun."""
    store = tmp_path / "store"
    torchx("run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", COMPONENTS + ":data",
           "--store", f"file://{store}", "--profile", "ci", cwd=tmp_path)
    s = open_store(f"file://{store}")
    assert s.get_json("stages/data/done.json")["profile"] == "ci"
    assert any(k.endswith(".parquet") for k in s.list("data/shards/"))


def test_local_cwd_runs_two_ranks_under_torchrun(tmp_path):
    """The generic `stage` component, two processes under torchrun, extra stage flags after `--`."""
    store = tmp_path / "store"
    torchx("run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", COMPONENTS + ":stage",
           "--module", "tests.fake_stages.allreduce", "-j", "1x2", "--store", f"file://{store}", "--", "--scale=10", cwd=tmp_path)
    out = open_store(f"file://{store}").get_json("outputs/allreduce.json")
    assert (out["sum"], out["world_size"]) == (30.0, 2)  # ranks 0 and 1 contributed (1 + 2) * 10


def test_kubernetes_dryrun_is_a_valid_volcano_job(tmp_path):
    p = torchx("run", "-s", "kubernetes", "--dryrun", "--workspace", "", "-cfg", "validate_spec=False,queue=default",
               COMPONENTS + ":base_train", "--store", "s3://bucket/run", "--image", "nanochat:1", "--", "--depth=4", cwd=tmp_path)
    out = p.stdout + p.stderr
    job = yaml.safe_load(out[out.index("=== SCHEDULER REQUEST ===") + len("=== SCHEDULER REQUEST ==="):])
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    assert job["spec"]["schedulerName"] == "volcano" and job["spec"]["queue"] == "default"
    assert validate.DNS1123_SUBDOMAIN.match(job["metadata"]["name"])
    (task,) = job["spec"]["tasks"]
    assert validate.pod_template_errors(task["template"]) == []
    c = task["template"]["spec"]["containers"][0]
    command = " ".join(c["command"])
    assert "-m nanochat.stages.base_train --store=s3://bucket/run --profile=d20 --depth=4" in command
    assert "--nproc_per_node 8" in command and c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert c["image"] == "nanochat:1"


def stage_components() -> list[str]:
    """The component functions TorchX can address in the file: public defs returning an AppDef."""
    tree = ast.parse(Path(COMPONENTS).read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
            and n.returns is not None and ast.unparse(n.returns).endswith("AppDef")]


def test_every_stage_module_of_the_pipeline_has_a_valid_component():
    """What TorchX does with `torchx run FILE:NAME`: parse the file, lint the def, load it, read its docstring."""
    from torchx.specs.file_linter import get_fn_docstring, validate as lint
    from torchx.specs.finder import get_component
    assert sorted(stage_components()) == sorted(["stage", *pipeline.MODULES])
    for name in pipeline.MODULES:
        assert lint(COMPONENTS, name) == [], name
        component = get_component(f"{COMPONENTS}:{name}")
        app = component.fn(store="s3://b/r")
        (role,) = app.roles
        assert role.entrypoint == "bash" and f"-m nanochat.stages.{name} --store=s3://b/r" in role.args[1], name
        assert role.metadata[tc.META_STAGE] == name
        summary, arg_help = get_fn_docstring(component.fn)
        step = next(s for s in pipeline.STEPS if s.module == name)
        assert summary.lower().startswith(step.description.lower()) or name == "chat_eval", (name, summary)
        assert arg_help["store"] == tc.ARG_HELP["store"] and arg_help["profile"].startswith("nanochat profile")
    assert "--source=rl" in tc.chat_eval(store="s3://b/r", source="rl").roles[0].args[1]


@pytest.mark.parametrize("call, nproc, gpus", [
    (lambda: tc.base_train(store="s3://b/r"), 8, 8),                        # d20: 1 node x 8 GPUs
    (lambda: tc.base_train(store="s3://b/r", profile="tiny"), 1, 0),        # CPU profile: one process, no GPU
    (lambda: tc.chat_eval(store="s3://b/r", profile="tiny"), 2, 0),         # the profile's processes for the stage
    (lambda: tc.tok_train(store="s3://b/r", profile="d20"), 1, 0),          # a CPU stage on a GPU profile
    (lambda: tc.base_train(store="s3://b/r", j="2x4", gpu=4), 4, 4),        # explicit placement wins
    (lambda: tc.stage(module="tests.fake_stages.echo", store="s3://b/r"), 1, 0),
    (lambda: tc.stage(module="mid_train", store="s3://b/r", profile="d24"), 8, 8),
])
def test_placement_follows_the_pipeline_and_profiles(call, nproc, gpus):
    (role,) = call().roles
    assert f"--nproc_per_node {nproc}" in role.args[1] and role.resource.gpu == gpus
    assert role.metadata[tc.META_NPROC] == str(nproc)


def test_pytorchjob_scheduler_renders_valid_jobs():
    app = tc.base_train(store="s3://b/r", image="img:1", j="2x8", s3_secret="s3creds", endpoint="http://minio:9000")
    job = app_to_pytorchjob(app, Opts(namespace="ml", queue="gpu"), job_name="nanochat-base-train-x1")
    assert validate.pytorchjob_errors(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1 and job["spec"]["nprocPerNode"] == "8"
    c = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["command"] == ["bash"]
    script = c["args"][1]
    assert "--rdzv_endpoint ${MASTER_ADDR:=localhost}:29500" in script and "--nnodes 2" in script
    assert "--rdzv_id 'nanochat-base-train-x1'" in script  # app_id → the job name
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3creds"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 2, "queue": "gpu"}
    with pytest.raises(ValueError, match="single-role"):
        app2 = tc.stage(module="x", store="s3://b/r")
        app2.roles.append(app2.roles[0])
        app_to_pytorchjob(app2, Opts())


def test_pytorchjob_scheduler_hardens_pods_like_the_operator():
    """Default: the operator's pod (non-root, read-only root, /tmp emptyDir, caches in /tmp); opt out for root images."""
    app = tc.base_train(store="s3://b/r", image="img:1", j="2x8", env={"HOME": "/work"})
    job = app_to_pytorchjob(app, Opts(service_account="trainer"), job_name="nanochat-base-train-x2")
    assert validate.pytorchjob_errors(job) == []
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["securityContext"] == POD_SECURITY_CONTEXT and pod["serviceAccountName"] == "trainer"
        (c,) = pod["containers"]
        assert c["securityContext"] == CONTAINER_SECURITY_CONTEXT
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"] and {"name": "tmp", "emptyDir": {}} in pod["volumes"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/torchinductor" and env["HOME"] == "/work"  # the role's own value wins
        assert [e["name"] for e in c["env"]].count("HOME") == 1
    plain = app_to_pytorchjob(app, Opts(hardened=False), job_name="nanochat-base-train-x3")
    pod = plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "securityContext" not in pod and "securityContext" not in pod["containers"][0]
    assert [v["name"] for v in pod["volumes"]] == ["dshm"] and validate.pytorchjob_errors(plain) == []


def test_pytorchjob_scheduler_is_found_through_its_entry_point(tmp_path):
    """What `[project.entry-points."torchx.schedulers"] pytorchjob = ...` gives an installed package."""
    site = tmp_path / "site"
    dist = site / "nanochat_k8s_entrypoint_test-0.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nanochat-k8s-entrypoint-test\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text("[torchx.schedulers]\npytorchjob = operators.torchx_scheduler:create_scheduler\n")
    p = torchx("run", "-s", "pytorchjob", "--dryrun", "--json", "--workspace", "", "-cfg", "namespace=ml",
               COMPONENTS + ":stage", "--module", "tests.fake_stages.allreduce", "-j", "3x2", "--store", "s3://b/r",
               "--image", "img:1", cwd=tmp_path, extra_path=str(site))
    job = json.loads(p.stdout)["request"]["resource"]
    assert validate.pytorchjob_errors(job) == []
    assert job["metadata"]["namespace"] == "ml" and job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2


def test_pytorchjob_scheduler_round_trip_against_an_api_server():
    from kubernetes import client as k8s
    from torchx.specs import AppState
    with MockAPI() as api:
        sched = create_scheduler("test", client=api.api_client())
        assert isinstance(sched, PyTorchJobScheduler)
        info = sched.submit_dryrun(tc.stage(module="tests.fake_stages.echo", store="s3://b/r", image="img:1"), {"namespace": "default"})
        app_id = sched.schedule(info)
        ns, name = app_id.split(":")
        assert ns == "default" and name == info.request.resource["metadata"]["name"]
        custom = k8s.CustomObjectsApi(api.api_client())

        def set_conditions(*types):
            conds = [{"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", "message": t} for t in types]
            custom.patch_namespaced_custom_object_status("kubeflow.org", "v1", ns, "pytorchjobs", name, {"status": {"conditions": conds}})

        assert sched.describe(app_id).state == AppState.SUBMITTED
        set_conditions("Created")
        assert sched.describe(app_id).state == AppState.PENDING
        set_conditions("Created", "Running")
        assert sched.describe(app_id).state == AppState.RUNNING
        set_conditions("Created", "Succeeded")
        desc = sched.describe(app_id)
        assert desc.state == AppState.SUCCEEDED and desc.roles_statuses[0].replicas[0].hostname == f"{name}-master-0"
        assert [a.app_id for a in sched.list({"namespace": "default"})] == [app_id]
        sched.delete(app_id)
        assert sched.describe(app_id) is None
