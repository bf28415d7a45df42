"""manifests/: in sync with the chart, the CRD identical everywhere, every object valid, RBAC exactly the operator's."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from operators import cli, crd, validate
from operators.manifests import RBAC_RULES, operator_manifests
from operators.pytorchjob import render_run
from tests import helmbin

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
SCHEMAS = MANIFESTS / "schemas"
SUBSET_SCHEMAS = {"ServiceMonitor": "monitoring.coreos.com_servicemonitors.v1.json",
                  "PodMonitor": "monitoring.coreos.com_podmonitors.v1.json",
                  "HTTPRoute": "gateway.networking.k8s.io_httproutes.v1.json"}


def load(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / rel).read_text()) if d]


def all_docs() -> list[tuple[str, dict]]:
    return [(str(p.relative_to(MANIFESTS)), d) for p in sorted(MANIFESTS.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_crd_copies_are_byte_identical():
    source = helmbin.CRD_SOURCE.read_bytes()
    assert source == crd.CRD_PATH.read_bytes()
    for copy_path in helmbin.CRD_COPIES:
        assert copy_path.read_bytes() == source, f"{copy_path} differs from operators/crds/nanochatrun.yaml"
    # and it is what operators.crd generates
    assert yaml.safe_load(source) == crd.crd()


def test_derived_files_are_in_sync_with_the_chart():
    stale = helmbin.sync(write=False)
    assert not stale, f"out of date: {stale}; run `python -m tests.helmbin sync`"


def test_sync_notices_drift(tmp_path, monkeypatch):
    """The check above can fail: a hand edit of a generated file is reported."""
    fake_repo = tmp_path / "repo"
    files = helmbin.manifest_files()
    for rel, text in files.items():
        (fake_repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake_repo / rel).write_text(text)
    (fake_repo / "manifests/operator.yaml").write_text(files["manifests/operator.yaml"].replace("replicas: 1", "replicas: 2"))
    monkeypatch.setattr(helmbin, "REPO", fake_repo)
    monkeypatch.setattr(helmbin, "manifest_files", lambda: files)
    assert helmbin.sync(write=False) == ["manifests/operator.yaml"]
    assert helmbin.sync(write=True) == ["manifests/operator.yaml"] and helmbin.sync(write=False) == []


def test_every_manifest_is_valid():
    errors = []
    docs = all_docs()
    for path, d in docs:
        where = f"{path}: {d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "CustomResourceDefinition":
            continue  # compared with the source above
        if d["kind"] == "NanochatRun":
            errs = validate.nanochatrun_errors(d)
        elif d["kind"] in SUBSET_SCHEMAS:
            schema = json.loads((SCHEMAS / SUBSET_SCHEMAS[d["kind"]]).read_text())
            errs = validate.schema_errors(schema, d) + validate.unknown_fields(schema, d)
        else:
            errs = validate.builtin_errors(d)
        errors += [f"{where}: {e}" for e in errs]
    assert not errors, "\n".join(errors)
    assert {d["kind"] for _, d in docs} >= {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
                                            "Service", "Ingress", "HTTPRoute", "PodDisruptionBudget", "NetworkPolicy",
                                            "ServiceMonitor", "PodMonitor", "ConfigMap", "NanochatRun", "CustomResourceDefinition"}


def test_nanochat_k8s_validate_accepts_the_builtin_and_run_files(capsys):
    """The project's own `nanochat-k8s validate` (strict, both Kubernetes versions) agrees."""
    files = [str(MANIFESTS / f) for f in ("namespace.yaml", "operator.yaml", "inference.yaml", "networkpolicies.yaml",
                                           "examples/tiny-cpu.yaml", "examples/d20-8xh100.yaml")]
    assert cli.main(["validate", *files]) == 0, capsys.readouterr().out


def test_everything_is_in_one_namespace():
    for path, d in all_docs():
        if d["kind"] in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Namespace"):
            continue
        assert d["metadata"].get("namespace") == helmbin.NAMESPACE, f"{path}: {d['kind']}/{d['metadata']['name']}"
    assert load("namespace.yaml")[0]["metadata"]["name"] == helmbin.NAMESPACE


def test_rbac_is_exactly_the_operators():
    role = next(d for d in load("operator.yaml") if d["kind"] == "ClusterRole")
    assert role["rules"] == RBAC_RULES
    python_role = next(d for d in operator_manifests("img:1") if d["kind"] == "ClusterRole")
    assert role["rules"] == python_role["rules"]  # `nanochat-k8s install` grants the same
    binding = next(d for d in load("operator.yaml") if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == helmbin.NAMESPACE
    # no Helm bookkeeping in kubectl manifests, and no labels in selectors were touched
    for _, d in all_docs():
        assert not set(d["metadata"].get("labels") or {}) & set(helmbin.HELM_ONLY_LABELS)


def test_examples_render_valid_pytorchjobs():
    for name, gpus in (("examples/tiny-cpu.yaml", 0), ("examples/d20-8xh100.yaml", 8)):
        run = copy.deepcopy(load(name)[0])
        run["metadata"]["uid"] = "00000000-0000-0000-0000-000000000002"
        jobs = {step.name: job for step, job in render_run(run)}
        assert jobs, name
        for step, job in jobs.items():
            assert not validate.pytorchjob_errors(job), (name, step, validate.pytorchjob_errors(job))
        train = jobs["base_train"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        limits = train["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) == gpus, name
        shm = next(v for v in train["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"] == ("64Gi" if gpus else "1Gi")
        image = run["spec"]["image"]
        assert ("nanochat-train" if gpus else "nanochat-cpu") in image and not image.endswith(":latest")


def test_inference_manifest_matches_the_d20_run():
    run = load("examples/d20-8xh100.yaml")[0]
    objs = {d["kind"]: d for d in load("inference.yaml")}
    assert set(objs) == {"Deployment", "Service", "Ingress", "PodDisruptionBudget"}
    deployment = objs["Deployment"]
    assert deployment["metadata"]["name"] == f"{run['metadata']['name']}-chat"
    assert deployment["spec"]["replicas"] == 0
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][c["command"].index("--store") + 1] == run["spec"]["store"]["uri"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == run["spec"]["serving"]["gpus"] == 1
    assert objs["Ingress"]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert objs["Ingress"]["spec"]["tls"][0]["secretName"] == "chat-example-com-tls"


@pytest.mark.parametrize("kind", sorted(SUBSET_SCHEMAS))
def test_subset_schemas_reject_unknown_fields(kind):
    """The third-party subsets catch a misspelt field (the API server would prune it silently)."""
    doc = next(d for _, d in all_docs() if d["kind"] == kind)
    schema = json.loads((SCHEMAS / SUBSET_SCHEMAS[kind]).read_text())
    assert not validate.schema_errors(schema, doc) and not validate.unknown_fields(schema, doc)
    bad = copy.deepcopy(doc)
    bad["spec"]["selectorr"] = {}
    assert validate.unknown_fields(schema, bad) == ["spec.selectorr: unknown field"]
