"""PyTorchJob rendering, the other owned objects, and `nanochat-k8s render|crd|example|validate`."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nanochat import pipeline, profiles
from nanochat.pipeline import Step
from operators import children, crd, validate
from operators.pytorchjob import (JOB_NAME_MAX, SpecError, job_name, new_run, plan_steps, render_run, render_stage_job,
                                  stage_resources)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def all_stages(monkeypatch):
    """Render the full pipeline even where a stage module is not in this checkout yet."""
    monkeypatch.setattr(pipeline, "module_exists", lambda m: True)


# d20's batches split over 8 processes; over 16 (2 nodes) each per-GPU batch is halved (docs/kubernetes.md)
TWO_NODE_BATCHES = ["base_train.device_batch_size=16", "mid_train.device_batch_size=16", "chat_sft.device_batch_size=2"]


def d20_run(**spec_changes):
    spec = copy.deepcopy(crd.example()["spec"])
    spec.update(spec_changes)
    return new_run("d20-first", spec, namespace="ml", uid="uid-1")


def container(job, replica="Master"):
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]


def env(c) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


@pytest.mark.parametrize("profile", profiles.names())
def test_every_profile_renders_valid_jobs_in_pipeline_order(all_stages, profile):
    run = new_run("d20-first", crd.example(profile=profile)["spec"], namespace="ml", uid="uid-1")  # the profile's resources
    rendered = render_run(run)
    names = [s.name for s, _ in rendered]
    assert names == [s.name for s in pipeline.steps_for(profile)]
    for step, job in rendered:
        assert validate.pytorchjob_errors(job) == [], step.name
        for dep in step.depends_on:
            assert names.index(dep) < names.index(step.name)


def test_gpu_stage_job(all_stages):
    job = dict(render_run(d20_run()))[next(s for s in plan_steps(d20_run()["spec"]) if s.name == "base_train")]
    c = container(job)
    assert c["name"] == "pytorch" and c["command"] == ["torchrun"]
    assert c["args"][:3] == ["--nproc-per-node=8", "-m", "nanochat.stages.base_train"]
    assert "--store=s3://nanochat/runs/d20-first" in c["args"] and "--profile=d20" in c["args"]
    assert not any(a.startswith(("--rdzv", "--nnodes", "--node-rank", "--node_rank", "--master")) for a in c["args"])
    assert job["spec"]["nprocPerNode"] == "8" and "Worker" not in job["spec"]["pytorchReplicaSpecs"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" == c["resources"]["requests"]["nvidia.com/gpu"]
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    e = env(c)
    assert e["NANOCHAT_METRICS_PORT"] == "9400" and e["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert e["NANOCHAT_PG_TIMEOUT_S"] == "1800" == e["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]
    assert e["AWS_ENDPOINT_URL"] == "http://minio.minio.svc:9000"
    assert e["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "nanochat-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert e["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "nanochat-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]
    assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in c["ports"]
    rp = job["spec"]["runPolicy"]
    assert rp == {"cleanPodPolicy": "Running", "backoffLimit": 0, "ttlSecondsAfterFinished": 86400}
    meta = job["metadata"]
    assert meta["ownerReferences"] == [{"apiVersion": "nanochat.dev/v1alpha1", "kind": "NanochatRun", "name": "d20-first",
                                        "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
    assert meta["labels"]["nanochat.dev/run"] == "d20-first" and meta["labels"]["nanochat.dev/stage"] == "base_train"
    assert meta["namespace"] == "ml" and meta["name"] == "d20-first-base-train-a1"


def test_cpu_stage_is_a_one_replica_job_without_gpus(all_stages):
    steps = plan_steps(d20_run()["spec"])
    data = next(s for s in steps if s.name == "data")
    job = render_stage_job(d20_run(), data)
    c = container(job)
    assert job["spec"]["nprocPerNode"] == "1" and c["args"][0] == "--nproc-per-node=1"
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and c["resources"]["limits"]["cpu"] == "8"


def test_multi_node_gang_scheduled_stage(all_stages):
    run = d20_run(resources={"gpu": {"gpusPerNode": 8}, "stages": {"base_train": {
        "nodes": 4, "nodeSelector": {"gpu": "h100"}, "priorityClassName": "train",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}},
        gangScheduling={"enabled": True, "queue": "gpu"}, jobPolicy={"restartPolicy": "ExitCode", "activeDeadlineSeconds": 86400})
    step = next(s for s in plan_steps(run["spec"]) if s.name == "base_train")
    job = render_stage_job(run, step, 3)
    assert validate.pytorchjob_errors(job) == []
    specs_ = job["spec"]["pytorchReplicaSpecs"]
    assert specs_["Master"]["replicas"] == 1 and specs_["Worker"]["replicas"] == 3
    assert specs_["Worker"]["template"] == specs_["Master"]["template"] and specs_["Worker"]["restartPolicy"] == "ExitCode"
    pod = specs_["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "train" and pod["tolerations"]
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4, "queue": "gpu"}
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 86400
    assert job["metadata"]["name"] == "d20-first-base-train-a3" and job["metadata"]["labels"]["nanochat.dev/attempt"] == "3"
    other = next(s for s in plan_steps(run["spec"]) if s.name == "mid_train")
    assert "Worker" not in render_stage_job(run, other)["spec"]["pytorchReplicaSpecs"]


def test_overrides_reach_their_stage_only(all_stages):
    run = d20_run(overrides=["base_train.depth=4", "seed=7"])
    steps = plan_steps(run["spec"])
    jobs = {s.name: render_stage_job(run, s) for s in steps}
    assert "--depth=4" in container(jobs["base_train"])["args"] and "--seed=7" in container(jobs["base_train"])["args"]
    assert "--depth=4" not in container(jobs["mid_train"])["args"] and "--seed=7" in container(jobs["mid_train"])["args"]
    assert "--source=mid" in container(jobs["chat_eval_mid"])["args"]
    with pytest.raises(SpecError, match="unknown stage 'nope'"):
        render_run(d20_run(overrides=["nope.depth=4"]))


def test_stage_selection(all_stages):
    spec = d20_run()["spec"]
    assert "chat_rl" not in [s.name for s in plan_steps(spec)]
    assert "chat_rl" in [s.name for s in plan_steps({**spec, "stages": {"rl": True}})]
    only = plan_steps({**spec, "stages": {"only": ["base_train", "base_eval"]}})
    assert [s.name for s in only] == ["base_train", "base_eval"] and only[1].depends_on == ("base_train",)
    assert "tok_eval" not in [s.name for s in plan_steps({**spec, "stages": {"skip": ["tok_eval"]}})]
    with pytest.raises(SpecError, match="unknown step"):
        plan_steps({**spec, "stages": {"only": ["base_trian"]}})


def test_resources_layering(all_stages):
    spec = crd.apply_defaults(d20_run(resources={"gpu": {"cpu": "32"}, "stages": {"chat_eval": {"gpusPerNode": 4}, "chat_eval_sft": {"cpu": 8}}})["spec"])
    steps = {s.name: s for s in plan_steps(spec)}
    assert stage_resources(spec, steps["chat_eval_mid"])["gpusPerNode"] == 4       # module key
    assert stage_resources(spec, steps["chat_eval_sft"])["cpu"] == 8                # step key wins
    assert stage_resources(spec, steps["base_train"]) == {**stage_resources(spec, steps["base_train"]), "gpusPerNode": 8, "cpu": "32"}
    tiny = crd.apply_defaults({**spec, "profile": "tiny"})
    assert stage_resources(tiny, steps["base_train"])["gpusPerNode"] == 0           # CPU profile: no GPUs


def test_job_names_are_deterministic_dns1035_and_short():
    assert job_name("d20-first", "chat_eval_mid", 2) == "d20-first-chat-eval-mid-a2"
    long = job_name("a-very-long-run-name-" * 4, "chat_eval_sft", 12)
    assert len(long) <= JOB_NAME_MAX and long.endswith("-chat-eval-sft-a12") and validate.DNS1035.match(long)
    assert long == job_name("a-very-long-run-name-" * 4, "chat_eval_sft", 12)
    assert long != job_name("a-very-long-run-name-" * 4 + "x", "chat_eval_sft", 12)
    assert validate.DNS1035.match(job_name("9lives.v2", "data", 1))


def test_children_objects_validate_strictly():
    run = d20_run()
    for obj in children.serving_objects(run, "chat_sft/000700"):
        assert validate.builtin_errors(obj) == [], obj["kind"]
    dep = children.serving_objects(run, "chat_sft/000700")[0]
    assert dep["spec"]["template"]["metadata"]["annotations"][children.ANN_CHECKPOINT] == "chat_sft/000700"
    assert dep["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["nanochat", "serve"]
    cm = children.report_configmap(run, "# report\n", "abc", "s3://x/report/report.md")
    assert validate.builtin_errors(cm) == [] and cm["data"]["report.md"] == "# report\n"
    big = children.report_configmap(run, "x" * 2_000_000, "abc", "s3://x/report/report.md")
    assert len(big["data"]["report.md"].encode()) < children.CONFIGMAP_MAX and "s3://x/report/report.md" in big["data"]["report.md"]
    ev = children.event(run, "Warning", "StageFailed", "boom", 1_800_000_000.5)
    assert validate.builtin_errors(ev) == [] and ev["involvedObject"]["uid"] == "uid-1"


def test_test_stage_modules_render_too():
    run = new_run("t", {"profile": "tiny", "image": "img", "store": {"uri": "file:///data/run"}})
    steps = plan_steps(run["spec"], [Step("e", "tests.fake_stages.echo", args=("--label=e",))])
    job = render_stage_job(run, steps[0])
    assert container(job)["args"][1:3] == ["-m", "tests.fake_stages.echo"] and "ownerReferences" not in job["metadata"]


# ----------------------------------------------------------------------------- the CLI

def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "operators.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_cli_render_prints_ordered_valid_jobs():
    out = cli("render", "--profile", "tiny", "--image", "img:1", "--store", "s3://b/run", "--namespace", "ml",
              "--secret", "s3creds", "--set", "seed=3", "--name", "demo").stdout
    docs = list(yaml.safe_load_all(out))
    expected = [s.name for s in pipeline.steps_for("tiny")]
    assert [d["metadata"]["labels"]["nanochat.dev/stage"] for d in docs] == expected
    assert len(docs) >= 1
    for d in docs:
        assert validate.pytorchjob_errors(d) == []
        assert d["metadata"]["namespace"] == "ml" and "--seed=3" in container(d)["args"]
        assert "ownerReferences" not in d["metadata"]
    assert "kubectl wait --for=condition=Succeeded pytorchjob/demo-" in out


def test_cli_render_to_numbered_files(tmp_path):
    p = cli("render", "--profile", "tiny", "--image", "img:1", "--store", "s3://b/run", "--out", str(tmp_path / "jobs"))
    files = sorted((tmp_path / "jobs").iterdir())
    assert [f.name.split("-", 1)[1][:-5] for f in files] == [s.name for s in pipeline.steps_for("tiny")]
    assert all(validate.pytorchjob_errors(yaml.safe_load(f.read_text())) == [] for f in files)
    assert "kubectl wait --for=condition=Succeeded -f $f" in p.stderr


def test_cli_render_from_a_nanochatrun_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(cli("example", "--profile", "tiny", "--name", "from-file").stdout)
    docs = list(yaml.safe_load_all(cli("render", "-f", str(path)).stdout))
    assert docs and all(d["metadata"]["name"].startswith("from-file-") for d in docs)
    assert all(validate.pytorchjob_errors(d) == [] for d in docs)


def test_cli_errors_are_one_line():
    p = cli("render", "--profile", "tiny", "--store", "s3://b/r", check=False)
    assert p.returncode == 2 and p.stderr.strip() == "nanochat-k8s: error: --image required (or -f run.yaml)"
    p = cli("render", "--image", "i", "--store", "s3://b/r", "--set", "nope.x=1", check=False)
    assert p.returncode == 2 and "unknown stage 'nope'" in p.stderr


def test_cli_crd_and_validate(tmp_path):
    assert yaml.safe_load(cli("crd").stdout) == crd.crd()
    bad = tmp_path / "bad.yaml"
    job = render_stage_job(new_run("x", {"image": "i", "store": {"uri": "s3://b/r"}}), Step("e", "tests.fake_stages.echo"))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    bad.write_text(yaml.safe_dump_all([job, crd.crd()]))
    p = cli("validate", str(bad), check=False)
    assert p.returncode == 1 and "FAIL" in p.stdout and "[Master].replicas: must be 1" in p.stdout
    assert "ok   " in p.stdout  # the CRD document itself is fine


def test_install_manifests_validate_and_grant_what_the_operator_calls():
    from operators.manifests import RBAC_RULES
    docs = list(yaml.safe_load_all(cli("install", "--image", "nanochat:1", "--watch", "ml").stdout))
    assert [d["kind"] for d in docs] == ["Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                                         "ClusterRoleBinding", "Deployment", "Service"]
    for d in docs:
        assert validate.builtin_errors(d) == [], d["kind"]
    dep = docs[5]["spec"]["template"]["spec"]["containers"][0]
    assert dep["command"][:4] == ["python", "-m", "operators.cli", "operator"] and "--namespace=ml" in dep["command"]
    granted = {(g, r, v) for rule in RBAC_RULES for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    needed = {("nanochat.dev", "nanochatruns", "watch"), ("nanochat.dev", "nanochatruns/status", "patch"),
              ("kubeflow.org", "pytorchjobs", "create"), ("kubeflow.org", "pytorchjobs", "delete"), ("kubeflow.org", "pytorchjobs", "list"),
              ("", "configmaps", "create"), ("", "configmaps", "patch"), ("", "events", "create"), ("", "secrets", "get"),
              ("apps", "deployments", "patch"), ("", "services", "create"), ("networking.k8s.io", "ingresses", "create")}
    assert needed <= granted


# ----------------------------------------------------------------------------- pod security, pull secrets, serving

def restricted_violations(pod_spec: dict) -> list[str]:
    """The Pod Security Standards' `restricted` profile, the checks that apply to what we render."""
    out = []
    pod_sc = pod_spec.get("securityContext") or {}
    for c in pod_spec["containers"]:
        sc = c.get("securityContext") or {}
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{c['name']}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []) or (sc.get("capabilities") or {}).get("add"):
            out.append(f"{c['name']}: capabilities")
        if (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: seccompProfile")
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
    for v in pod_spec.get("volumes") or []:
        if set(v) - {"name"} - {"emptyDir", "configMap", "secret", "projected", "persistentVolumeClaim", "downwardAPI", "ephemeral", "csi"}:
            out.append(f"volume {v['name']}: type")
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        out.append("host namespaces")
    return out


def writable_paths(pod_spec: dict, container: dict) -> set[str]:
    """Where the container can write with a read-only root filesystem: its volume mounts."""
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    return {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}


def pod_specs_of(job) -> list[dict]:
    return [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


def test_training_pods_are_restricted_with_a_read_only_root(all_stages):
    run = d20_run(resources={"gpu": {"gpusPerNode": 8, "nodes": 2}}, overrides=TWO_NODE_BATCHES)
    jobs = render_run(run)
    assert any("Worker" in job["spec"]["pytorchReplicaSpecs"] for _, job in jobs)
    for step, job in jobs:
        assert validate.pytorchjob_errors(job) == [], step.name  # kubernetes-validate --strict on every pod template
        for pod in pod_specs_of(job):
            assert restricted_violations(pod) == [], step.name
            assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                              "seccompProfile": {"type": "RuntimeDefault"}}
            assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
            (c,) = pod["containers"]
            assert writable_paths(pod, c) == {"/tmp", "/dev/shm"}
            assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
            e = env(c)
            # everything the stages, torch.compile and triton write goes under /tmp
            for var in ("HOME", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
                assert e[var] == "/tmp" or e[var].startswith("/tmp/"), var
            assert e["PYTHONDONTWRITEBYTECODE"] == "1"


def test_security_context_overrides_and_tmp_size(all_stages):
    openshift = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}  # the SCC picks the uid
    run = d20_run(podSecurityContext=openshift, serviceAccountName="s3-writer",
                  resources={"gpu": {"gpusPerNode": 8, "tmpSize": "200Gi"}, "cpu": {"cpu": "8", "tmpSize": "20Gi"}})
    assert validate.nanochatrun_errors(run) == []
    jobs = {s.name: job for s, job in render_run(run)}
    for name, size in (("base_train", "200Gi"), ("data", "20Gi")):
        (pod,) = pod_specs_of(jobs[name])
        assert pod["securityContext"] == openshift and restricted_violations(pod) == []
        assert {"name": "tmp", "emptyDir": {"sizeLimit": size}} in pod["volumes"]
        assert pod["serviceAccountName"] == "s3-writer" and "automountServiceAccountToken" not in pod
        assert validate.pytorchjob_errors(jobs[name]) == []
    # the overrides pass through to kubernetes-validate --strict: a misspelt field fails validation
    typo = d20_run(containerSecurityContext={"allowPrivilegeEscalation": False, "readOnlyRootFileSystem": True})
    assert validate.nanochatrun_errors(typo) == []  # preserved as is by the CRD...
    errors = validate.pytorchjob_errors(dict(render_run(typo))[next(s for s in plan_steps(typo["spec"]) if s.name == "data")])
    assert any("readOnlyRootFileSystem" in e for e in errors), errors  # ...and caught on the pod


def test_image_pull_secrets_reach_every_pod_the_operator_creates(all_stages, tmp_path):
    secrets = [{"name": "ghcr-pull"}, {"name": "mirror-pull"}]
    run = d20_run(imagePullSecrets=secrets, resources={"gpu": {"gpusPerNode": 8, "nodes": 2}}, overrides=TWO_NODE_BATCHES)
    assert validate.nanochatrun_errors(run) == []
    for _, job in render_run(run):
        for pod in pod_specs_of(job):
            assert pod["imagePullSecrets"] == secrets
    deployment = children.serving_objects(run, "chat_sft/000700")[0]
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == secrets
    assert "imagePullSecrets" not in pod_specs_of(render_run(d20_run())[0][1])[0]
    # a NanochatRun manifest → `nanochat-k8s render -f` → jobs with the secrets
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(new_run("pull", {"profile": "tiny", "image": "registry.example/nanochat:1",
                                                      "store": {"uri": "s3://b/r"}, "imagePullSecrets": secrets[:1]})))
    docs = list(yaml.safe_load_all(cli("render", "-f", str(path)).stdout))
    assert docs and all(pod_specs_of(d)[0]["imagePullSecrets"] == secrets[:1] for d in docs)


def chart_chat_deployment() -> dict:
    from tests import helmbin
    return next(d for d in helmbin.template() if d["kind"] == "Deployment"
                and d["metadata"]["labels"].get("app.kubernetes.io/component") == "inference")


def test_fallback_serving_deployment_matches_the_charts_chat_deployment():
    """When the chart's Deployment does not exist the operator creates its own: same probes, shutdown and security."""
    run = d20_run()
    ours = children.serving_objects(run, "chat_sft/000700")[0]
    assert validate.builtin_errors(ours) == []
    chart = chart_chat_deployment()
    pod, chart_pod = ours["spec"]["template"]["spec"], chart["spec"]["template"]["spec"]
    (c,), (chart_c,) = pod["containers"], chart_pod["containers"]
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "securityContext"):
        assert c[key] == chart_c[key], key
    assert pod["securityContext"] == chart_pod["securityContext"] and restricted_violations(pod) == []
    assert pod["terminationGracePeriodSeconds"] == chart_pod["terminationGracePeriodSeconds"]
    assert ours["spec"]["strategy"] == chart["spec"]["strategy"]
    assert c["command"][c["command"].index("--drain-timeout") + 1] == chart_c["command"][chart_c["command"].index("--drain-timeout") + 1]
    assert writable_paths(pod, c) == {"/tmp"} and {m["mountPath"] for m in chart_c["volumeMounts"]} == {"/tmp"}
    chart_env = {e["name"]: e["value"] for e in chart_c["env"] if "value" in e}
    assert {k: v for k, v in env(c).items() if k in chart_env} == chart_env
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}} in children.serving_objects(
        d20_run(serving={"enabled": True, "tmpSize": "8Gi"}), "x")[0]["spec"]["template"]["spec"]["volumes"]


def test_fallback_serving_probes_answer_on_nanochat_serve():
    """The probe paths and the command are what `nanochat serve` provides (its real parser and app)."""
    import threading
    import time

    from fastapi.testclient import TestClient

    from nanochat.serve import build_parser, create_app
    c = children.serving_objects(d20_run(), "chat_sft/000700")[0]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(c["command"][2:])
    assert args.port == c["ports"][0]["containerPort"] and args.drain_timeout == children.DRAIN_S and args.batch_rows == 8
    single = children.serving_objects(d20_run(serving={"enabled": True, "batchRows": 1}), "x")[0]["spec"]["template"]["spec"]
    assert build_parser().parse_args(single["containers"][0]["command"][2:]).batch_rows == 1
    gate = threading.Event()

    def loader(devices):  # still loading while the probes are checked
        gate.wait(30)
        raise RuntimeError("test over")
    try:
        with TestClient(create_app(loader=loader, devices=["cpu"])) as client:
            assert client.get(c["startupProbe"]["httpGet"]["path"]).status_code == 200
            assert client.get(c["livenessProbe"]["httpGet"]["path"]).status_code == 200
            assert client.get(c["readinessProbe"]["httpGet"]["path"]).status_code == 503  # not ready before the model is in
            gate.set()
            for _ in range(300):  # let the load fail (and log) while the test still owns the log streams
                if client.get(c["readinessProbe"]["httpGet"]["path"]).json()["status"] == "failed":
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the failed load never showed on the readiness probe")
    finally:
        gate.set()
