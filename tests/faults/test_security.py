"""Security posture: S3 credentials never reach an output (stage and runner logs, the store's reports, state,
done.json, history, checkpoints, `nanochat status`/`report`, `nanochat-k8s render`), even on the error paths;
images run as non-root; the operator's RBAC grants no wildcards and no more than reading Secrets."""
from __future__ import annotations

import contextlib
import io
import re

import yaml

from nanochat import cli
from nanochat.pipeline import Step
from nanochat.runner import LocalExecutor, Runner
from operators import cli as k8s_cli
from operators.manifests import RBAC_RULES
from tests.faults import harness as h

# recognisable credentials: moto accepts any
ACCESS_KEY = "AKIACANARY7Q2W9E4R1T"
SECRET_KEY = "canary/SecretKey+9fQ2xLr7VbN1mPz5KdT8wYhJ3sGc"
CREDS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
LEAKS = [s.encode() for s in (ACCESS_KEY, SECRET_KEY, SECRET_KEY.split("/")[1][:16])]


def leaks_in(name: str, data: bytes | str) -> list[str]:
    data = data.encode(errors="replace") if isinstance(data, str) else data
    return [f"{name} contains {leak.decode()[:8]}…" for leak in LEAKS if leak in data]


def test_s3_credentials_never_appear_in_outputs(lab, tmp_path):
    """base_train fails on a policy that denies checkpoint writes; then a runner drives a stage that fails once and
    base_train against S3. Every byte those runs left anywhere is searched for the key id and the secret."""
    uri = f"s3://{lab.s3.bucket()}/run"
    h.copy_into(lab.prepared, lab.s3.store(uri, creds=CREDS))
    # the error path first: a policy denies checkpoint writes (the message names the object, never the key)
    proxy = lab.s3.proxy(lambda m, p, n: ("status", 403, "AccessDenied") if m == "PUT" and "/checkpoints/" in p else None)
    denied = h.Train(uri, tmp_path / "denied", env={**CREDS, "AWS_ENDPOINT_URL": proxy.url})
    assert denied.wait() != 0 and "S3 denied upload" in denied.log
    env = h.subprocess_env(tmp_path, {**CREDS, "AWS_ENDPOINT_URL": lab.s3.moto.url})
    events = []
    flags = [f for f in h.FLAGS if not f.startswith(("--num-iterations", "--save-every"))] + ["--num-iterations=6", "--save-every=3"]
    steps = [Step("echo_flaky", "tests.fake_stages.echo", args=("--label=flaky", "--fail-times=1")),
             Step("base_train", "base_train", args=tuple(flags), depends_on=("echo_flaky",))]
    with h.patched_env({**CREDS, "AWS_ENDPOINT_URL": lab.s3.moto.url}):
        store = lab.s3.store(uri, creds=CREDS)
        runner = Runner(store, steps, "tiny", executor=LocalExecutor(tmp_path / "runner-logs", env=env, echo=False),
                        max_retries=1, backoff_s=0.1, env=env, on_event=events.append)
        assert runner.run(), events
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main(["status", "--store", uri]) == 0
            assert cli.main(["report", "--store", uri, "-o", str(tmp_path / "report.md")]) == 0

    found = leaks_in("runner events", "\n".join(events)) + leaks_in("status/report output", out.getvalue() + err.getvalue())
    found += leaks_in("denied run", denied.log)
    outputs = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    for path in outputs:
        found += leaks_in(str(path.relative_to(tmp_path)), path.read_bytes())
    keys = store.list("")
    for key in keys:
        found += leaks_in(store.uri(key), store.get_bytes(key))
    assert not found, found
    # and the search looked where it should: logs, reports, state, markers, history, checkpoints
    assert any(p.suffix == ".log" for p in outputs) and (tmp_path / "report.md").exists()
    for expected in ("runner/state.json", "stages/base_train/done.json", "stages/base_train/history.jsonl",
                     "report/base_train.md", "checkpoints/base_train/000006/meta.json", "logs/base_train.attempt1.log"):
        assert expected in keys, (expected, keys)
    assert any(k.startswith("logs/echo_flaky") for k in keys)


def test_k8s_render_references_the_secret_never_its_value(tmp_path, monkeypatch):
    """Credentials in the rendering machine's environment stay there: the PyTorchJobs point at the Secret."""
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    run = {"apiVersion": "nanochat.dev/v1alpha1", "kind": "NanochatRun", "metadata": {"name": "canary"},
           "spec": {"profile": "d20", "image": "img:1", "store": {"uri": "s3://bucket/run", "secretName": "s3-creds",
                                                                     "endpoint": "http://minio:9000"}}}
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump(run))
    outputs = []
    for argv in (["render", "-f", str(manifest)],
                 ["render", "--profile=d20", "--image=img:1", "--store=s3://bucket/run", "--secret=s3-creds"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert k8s_cli.main(argv) == 0
        outputs.append(out.getvalue())
    with contextlib.redirect_stdout(out := io.StringIO()):
        assert k8s_cli.main(["install", "--image=img:1"]) == 0
    outputs.append(out.getvalue())
    for text in outputs:
        assert not leaks_in("render output", text)
    for text in outputs[:2]:
        jobs = list(yaml.safe_load_all(text))
        assert jobs
        for job in jobs:
            env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
            creds = {e["name"]: e for e in env if e["name"].startswith("AWS_") and "KEY" in e["name"]}
            assert set(creds) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            assert all("value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "s3-creds" for e in creds.values())


def test_images_run_as_a_non_root_user():
    dockerfiles = sorted((h.REPO / "docker").glob("Dockerfile*"))
    assert dockerfiles
    for path in dockerfiles:
        users = re.findall(r"^\s*USER\s+(\S+)", path.read_text(), flags=re.M)
        assert users, f"{path.name}: no USER (runs as root)"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), f"{path.name}: final USER is {user}"


def test_operator_rbac_has_no_wildcards_and_only_reads_secrets():
    dangerous_verbs = {"*", "escalate", "bind", "impersonate"}
    for rule in RBAC_RULES:
        assert "*" not in rule["apiGroups"] and "*" not in rule["resources"], rule
        assert not dangerous_verbs & set(rule["verbs"]), rule
        assert not {"pods/exec", "pods/attach", "nodes", "clusterroles", "clusterrolebindings", "roles", "rolebindings"} & set(rule["resources"]), rule
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"], rule  # reads the run's S3 Secret by name: no list/watch of every Secret


def pod_specs(doc: dict):
    """Every pod spec inside a rendered object (Deployment template, PyTorchJob replica templates)."""
    if doc.get("kind") == "Deployment":
        yield doc["spec"]["template"]["spec"]
    if doc.get("kind") == "PyTorchJob":
        for replica in doc["spec"]["pytorchReplicaSpecs"].values():
            yield replica["template"]["spec"]


def test_rendered_pods_run_as_non_root_without_privilege_escalation():
    """`nanochat-k8s render` (training jobs) and `install` (the operator): non-root, no escalation, no capabilities."""
    texts = []
    for argv in (["render", "--profile=d20", "--image=img:1", "--store=s3://bucket/run", "--secret=s3"],
                 ["render", "--profile=tiny", "--image=img:1", "--store=s3://bucket/run"], ["install", "--image=img:1"]):
        with contextlib.redirect_stdout(out := io.StringIO()):
            assert k8s_cli.main(argv) == 0
        texts.append(out.getvalue())
    pods = [spec for text in texts for doc in yaml.safe_load_all(text) if doc for spec in pod_specs(doc)]
    assert len(pods) > 5
    for spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"].get("runAsUser", 1) != 0
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for container in spec["containers"]:
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"), container["name"]
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add"), container["name"]
