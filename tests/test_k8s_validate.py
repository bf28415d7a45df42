"""The NanochatRun CRD and the offline validators (PyTorchJob schema + webhook rules, strict built-ins)."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from operators import crd, validate
from operators.pytorchjob import new_run, render_stage_job
from nanochat.pipeline import Step

SHARED = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kubeflow.org_pytorchjobs.yaml"


# ----------------------------------------------------------------------------- the CRD

def test_crd_file_is_generated_from_crd_py():
    assert crd.CRD_PATH.read_text() == crd.crd_yaml(), "run `python -m operators.crd` to regenerate operators/crds/nanochatrun.yaml"
    assert yaml.safe_load(crd.CRD_PATH.read_text()) == crd.crd()


def test_crd_is_a_valid_customresourcedefinition_for_each_k8s_version():
    assert validate.builtin_errors(crd.crd()) == []
    v = crd.crd()["spec"]["versions"][0]
    assert v["subresources"] == {"status": {}}
    assert [c["name"] for c in v["additionalPrinterColumns"]] == ["Profile", "Phase", "Stage", "Progress", "Age"]


def _walk(node, path="$"):
    yield path, node
    for key in ("properties", "additionalProperties", "items"):
        sub = node.get(key)
        if isinstance(sub, dict) and key != "properties":
            yield from _walk(sub, f"{path}.{key}")
        elif key == "properties" and sub:
            for name, child in sub.items():
                yield from _walk(child, f"{path}.{name}")


def test_crd_schema_is_structural_and_its_defaults_validate():
    """What the API server enforces on a CRD: a type on every node, defaults valid against their schema."""
    for path, node in _walk(crd.schema()):
        if node.get("x-kubernetes-int-or-string"):
            assert node.get("anyOf") == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
        if node.get("type") == "object":
            assert not (node.get("properties") and node.get("additionalProperties")), path
        if "default" in node:
            jsonschema.Draft202012Validator(node).validate(node["default"])
            defaulted = crd.apply_defaults(node["default"], node)
            jsonschema.Draft202012Validator(node).validate(defaulted)


def test_apply_defaults_fills_nested_defaults_like_the_api_server():
    spec = crd.apply_defaults({"image": "img", "store": {"uri": "s3://b/p"}})
    assert spec["profile"] == "d20" and spec["retries"] == {"limit": 2, "backoffSeconds": 60, "maxBackoffSeconds": 1800,
                                                            "restartingTimeoutSeconds": 900, "pendingTimeoutSeconds": 3600}
    assert spec["jobPolicy"]["restartPolicy"] == "Never" and spec["serving"]["enabled"] is False
    assert spec["store"]["accessKeyIdKey"] == "AWS_ACCESS_KEY_ID"
    kept = crd.apply_defaults({"image": "img", "store": {"uri": "s3://b/p"}, "retries": {"limit": 5}})
    assert kept["retries"]["limit"] == 5 and kept["retries"]["backoffSeconds"] == 60


def test_example_run_is_valid():
    run = crd.example()
    assert validate.nanochatrun_errors(run) == []


def test_default_images_are_the_ones_the_chart_and_manifests_publish():
    root = Path(__file__).resolve().parents[1]
    images = yaml.safe_load((root / "helm/nanochat-speedrun/values.yaml").read_text())["images"]
    chart = {k: f"{v['repository']}:{v['tag']}" for k, v in images.items() if k in ("train", "cpu")}
    assert crd.example(profile="d20")["spec"]["image"] == chart["train"]
    assert crd.example(profile="tiny")["spec"]["image"] == chart["cpu"]
    assert crd.example(profile="tiny", image="me/x:1")["spec"]["image"] == "me/x:1"
    for name in ("d20-8xh100", "tiny-cpu"):
        example = yaml.safe_load((root / f"manifests/examples/{name}.yaml").read_text())
        assert example["spec"]["image"] in chart.values()
    if "NANOCHAT_IMAGE" not in os.environ:
        from operators import torchx_components
        assert torchx_components.IMAGE == chart["train"]


@pytest.mark.parametrize("mutate, expect", [
    (lambda s: s.pop("image"), "'image' is a required property"),
    (lambda s: s.update(profile="d99"), "'d99' is not one of"),
    (lambda s: s["store"].update(uri="ftp://x"), "does not match"),
    (lambda s: s.update(overrides=["no equals sign"]), "does not match"),
    (lambda s: s.update(retries={"limit": -1}), "less than the minimum"),
    (lambda s: s.update(resources={"gpu": {"memory": "lots"}}), "does not match"),
    (lambda s: s.update(imagePullpolicy="Always"), "spec.imagePullpolicy: unknown field"),
    (lambda s: s.update(resources={"stages": {"base_train": {"gpus": 4}}}), "spec.resources.stages.base_train.gpus: unknown field"),
    (lambda s: s.update(imagePullSecrets=[{"secret": "regcred"}]), "'name' is a required property"),
    (lambda s: s.update(imagePullSecrets=[{"name": ""}]), "should be non-empty"),
    (lambda s: s.update(imagePullSecrets="regcred"), "is not of type 'array'"),
    (lambda s: s.update(resources={"gpu": {"tmpSize": "big"}}), "does not match"),
    (lambda s: s.update(podSecurityContext="nonroot"), "is not of type 'object'"),
])
def test_invalid_runs_are_rejected(mutate, expect):
    run = crd.example()
    mutate(run["spec"])
    errors = validate.nanochatrun_errors(run)
    assert any(expect in e for e in errors), errors


# ----------------------------------------------------------------------------- the vendored PyTorchJob schema

def test_vendored_pytorchjob_schema_matches_shared_copy():
    if not SHARED.exists():
        pytest.skip("../shared/schemas is not present (fresh clone): the vendored copy is used as is")
    shared = validate.crd_schema(yaml.safe_load(SHARED.read_text()), "v1")
    assert validate.strip_descriptions(shared) == json.loads(validate.PYTORCHJOB_SCHEMA.read_text())


def test_vendored_schema_is_the_pytorchjob_v1_schema():
    s = validate.pytorchjob_schema()
    assert set(s["properties"]["spec"]["properties"]) == {"elasticPolicy", "nprocPerNode", "pytorchReplicaSpecs", "runPolicy"}
    assert "description" not in json.dumps(s)[:10_000]


# ----------------------------------------------------------------------------- webhook rules (negative tests)

def good_job() -> dict:
    run = new_run("r1", {"profile": "tiny", "image": "img:1", "store": {"uri": "s3://b/r"}}, namespace="ns", uid="u")
    return render_stage_job(run, Step("a", "tests.fake_stages.echo"), 1)


def test_rendered_job_passes_every_check():
    assert validate.pytorchjob_errors(good_job()) == []


@pytest.mark.parametrize("mutate, expect", [
    (lambda j: j["metadata"].update(name="1-starts-with-digit"), "DNS-1035"),
    (lambda j: j["metadata"].update(name="Upper-Case"), "DNS-1035"),
    (lambda j: j["metadata"].update(name="a" * 64), "DNS-1035"),
    (lambda j: j["metadata"].update(name="has.dot"), "DNS-1035"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Master"]), "unsupported replica type 'Chief'"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "[Master].replicas: must be 1"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].pop("replicas"), "[Master].replicas: must be 1"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(name="trainer"),
     "must have at least one container with name pytorch"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].pop("image"), "image: must be required"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"].update(containers=[]), "containers: must be specified"),
    (lambda j: j["spec"].update(elasticPolicy={"minReplicas": 1, "maxReplicas": 2}), "[Worker]: must be configured if elastic policy"),
    (lambda j: j["spec"].update(pytorchReplicaSpecs={}), "spec.pytorchReplicaSpecs: must be required"),
    (lambda j: j["spec"]["runPolicy"].update(managedBy="someone-else"), "managedBy"),
])
def test_webhook_rules_reject(mutate, expect):
    job = good_job()
    mutate(job)
    errors = validate.webhook_errors(job)
    assert any(expect in e for e in errors), errors
    with pytest.raises(validate.ValidationFailed):
        validate.check_pytorchjob(job)


def test_elastic_policy_with_a_worker_is_accepted():
    job = good_job()
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    job["spec"]["pytorchReplicaSpecs"]["Worker"] = {**copy.deepcopy(master), "replicas": 1}
    job["spec"]["elasticPolicy"] = {"minReplicas": 1, "maxReplicas": 3}
    assert validate.webhook_errors(job) == []


@pytest.mark.parametrize("mutate, expect", [
    (lambda j: j["spec"].update(nprocPerNode=8), "is not of type 'string'"),                          # schema
    (lambda j: j["spec"]["runPolicy"].update(backoffLimit="3"), "is not of type 'integer'"),          # schema
    (lambda j: j["spec"].update(nProcPerNode="8"), "spec.nProcPerNode: unknown field"),               # pruned field
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(imagePullpolicy="x"),
     "unknown field"),                                                                               # typo inside the pod
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="80"),
     "is not of type 'integer'"),
    (lambda j: j["metadata"]["labels"].update(bad="not a label value"), "not a valid label value"),
])
def test_schema_and_strict_checks_reject(mutate, expect):
    job = good_job()
    mutate(job)
    errors = validate.pytorchjob_errors(job)
    assert any(expect in e for e in errors), errors


def test_builtin_validation_is_strict():
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
    assert validate.builtin_errors(cm) == []
    assert validate.builtin_errors({**cm, "dta": {}}) != []
    assert any("1.30" in e for e in validate.builtin_errors({**cm, "dta": {}}))
    assert any("1.37" in e for e in validate.builtin_errors({**cm, "dta": {}}))
