"""`nanochat-k8s`: render PyTorchJobs for kubectl, print the CRD / an example run, validate manifests, run the operator.

    nanochat-k8s render --profile d20 --image IMG --store s3://bucket/run [--namespace N] [--secret S] [--endpoint URL]
    nanochat-k8s render -f run.yaml                # from a NanochatRun manifest
    nanochat-k8s install --image IMG | kubectl apply -f -    # CRD + RBAC + operator, without Helm
    nanochat-k8s crd | example | validate FILE... | operator [--namespace N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

import nanochat
from nanochat import profiles

from operators import crd, validate
from operators.pytorchjob import OverrideError, SpecError, new_run, render_run


def _spec_from_args(args) -> dict:
    spec = {"profile": args.profile, "image": args.image, "store": {"uri": args.store}, "overrides": args.set}
    if args.endpoint:
        spec["store"]["endpoint"] = args.endpoint
    if args.secret:
        spec["store"]["secretName"] = args.secret
    if args.region:
        spec["store"]["region"] = args.region
    stages = {k: v for k, v in {"only": args.only, "skip": args.skip}.items() if v}
    if args.rl is not None:
        stages["rl"] = args.rl
    if stages:
        spec["stages"] = stages
    if args.gpus_per_node is not None or args.nodes is not None:
        spec["resources"] = {"gpu": {k: v for k, v in {"gpusPerNode": args.gpus_per_node, "nodes": args.nodes}.items() if v is not None}}
    return spec


class ManifestError(Exception):
    """A manifest file that cannot be read or is not Kubernetes objects: one error line, exit 2."""


def read_manifests(path: str) -> list[dict]:
    """The documents of a YAML file (empty ones dropped); each must be a mapping (a Kubernetes object)."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as e:  # missing, a directory, no permission
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path} is not a UTF-8 text file") from None
    except ValueError as e:  # a NUL byte in the path
        raise ManifestError(f"cannot read {path!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ManifestError(f"cannot parse {path}: " + " ".join(str(e).split())) from None
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise ManifestError(f"{path}: document {i} is a {type(doc).__name__}, not a Kubernetes object (a mapping)")
        if not isinstance(doc.get("metadata", {}), dict):
            raise ManifestError(f"{path}: document {i}: metadata is a {type(doc['metadata']).__name__}, not a mapping")
        for field in ("apiVersion", "kind"):
            if not doc.get(field) or not isinstance(doc[field], str):
                what = "missing" if doc.get(field) in (None, "") else f"not a string ({doc[field]!r})"
                raise ManifestError(f"{path}: document {i}: {field} is {what}; every Kubernetes object needs apiVersion and kind")
    return docs


def render(args) -> int:
    if args.file:
        try:
            runs = [d for d in read_manifests(args.file) if d.get("kind") == crd.KIND]
        except ManifestError as e:
            return _fail(str(e))
        if not runs:
            return _fail(f"no {crd.KIND} in {args.file}")
        run = runs[0]
        errors = validate.nanochatrun_errors(run, stages=False)  # stage flags: render_run, one line
        if errors:
            return _fail("invalid NanochatRun:\n  " + "\n  ".join(errors))
        if args.namespace:
            run["metadata"]["namespace"] = args.namespace
        run["metadata"].pop("uid", None)  # standalone jobs: nothing owns them
    else:
        missing = [f"--{k}" for k in ("image", "store") if not getattr(args, k)]
        if missing:
            return _fail(f"{', '.join(missing)} required (or -f run.yaml)")
        run = new_run(args.name, _spec_from_args(args), namespace=args.namespace)
        errors = validate.nanochatrun_errors(run, stages=False)
        if errors:
            return _fail("invalid settings:\n  " + "\n  ".join(errors))
    try:
        rendered = render_run(run)  # every stage parses its flags here, as `nanochat speedrun` does before any work
    except OverrideError as e:
        return _fail(str(e) if args.file else f"--set {e.item!r}: {e.detail}")
    except SpecError as e:
        return _fail(str(e) if args.file else str(e).removeprefix("spec.overrides: "))
    uri = run["spec"]["store"]["uri"]
    if uri.startswith("file://"):
        where = f"spec.store.uri {uri}" if args.file else f"--store {uri}"
        msg = (f"{where}: each pod would write to its own ephemeral filesystem, so no stage would see another's outputs; "
               f"on Kubernetes a file:// store must be a shared (ReadWriteMany) volume mounted at {uri.removeprefix('file://')} "
               f"in every pod, which render does not add")
        if not args.allow_file_store:
            return _fail(f"{msg}: use an s3:// store, or add that volume to the jobs yourself and pass --allow-file-store")
        print(f"nanochat-k8s: warning: {msg}: add that volume to every job before applying them", file=sys.stderr)
    if not rendered:
        return _fail("no stages are available in this install")
    docs = []
    for i, (step, job) in enumerate(rendered, 1):
        validate.check_pytorchjob(job)
        after = f" after {', '.join(step.depends_on)}" if step.depends_on else ""
        name = job["metadata"]["name"]
        header = (f"# {i}/{len(rendered)} {step.name}: {step.description}\n"
                  f"# apply{after or ' first'}; then: kubectl wait --for=condition=Succeeded pytorchjob/{name} --timeout=-1s\n")
        docs.append((f"{i:02d}-{step.name}.yaml", header + yaml.safe_dump(job, sort_keys=False)))
    if args.out:  # one file per step, in order: apply and wait for each in turn
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for fname, text in docs:
            (out / fname).write_text(text)
        print(f"wrote {len(docs)} PyTorchJobs to {out}/; run them in order:\n"
              f"  for f in {out}/*.yaml; do kubectl apply -f $f && kubectl wait --for=condition=Succeeded -f $f --timeout=-1s || break; done",
              file=sys.stderr)
    else:
        sys.stdout.write("---\n".join(text for _, text in docs))
    return 0


def validate_files(args) -> int:
    bad = 0
    for path in args.files:
        try:
            docs = read_manifests(path)
        except ManifestError as e:
            return _fail(str(e))
        for doc in docs:
            if not doc:
                continue
            meta = doc.get("metadata")
            what = f"{path}: {doc.get('kind')} {meta.get('name') if isinstance(meta, dict) else None}"
            try:
                validate.check(doc)
                print(f"ok   {what}")
            except validate.ValidationFailed as e:
                bad += 1
                print(f"FAIL {what}\n  " + "\n  ".join(e.errors))
    return 1 if bad else 0


def print_crd(args) -> int:
    sys.stdout.write(crd.crd_yaml())
    return 0


def print_example(args) -> int:
    sys.stdout.write(yaml.safe_dump(crd.example(args.name, args.image, args.profile, args.store), sort_keys=False))
    return 0


def install(args) -> int:
    from operators.manifests import operator_manifests
    docs = operator_manifests(args.image, namespace=args.namespace, watch=args.watch, metrics_port=args.metrics_port,
                              health_port=args.health_port)
    for d in docs:
        validate.check(d)
    sys.stdout.write("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    return 0


def operator(args) -> int:
    from operators.operator import main
    if args.health_port and args.health_port == args.metrics_port:
        return _fail(f"--health-port and --metrics-port are both {args.metrics_port}: kopf's /healthz needs its own port")
    return main(namespaces=args.namespace or None, interval=args.interval, metrics_port=args.metrics_port,
                health_port=args.health_port)


def _fail(msg: str) -> int:
    print(f"nanochat-k8s: error: {msg}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanochat-k8s", description="nanochat on Kubernetes: PyTorchJobs, the NanochatRun operator")
    p.add_argument("--version", action="version", version=f"nanochat-k8s {nanochat.version()} (NanochatRun {crd.API_VERSION})")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="print the ordered PyTorchJob YAMLs of a run (for clusters without the operator)")
    r.add_argument("-f", "--file", help="a NanochatRun manifest (instead of the flags below)")
    r.add_argument("--profile", default="d20", choices=profiles.names())
    r.add_argument("--image", help="container image with nanochat installed")
    r.add_argument("--store", help="artifact store: s3://bucket/prefix")
    r.add_argument("--name", default="nanochat", help="run name (job name prefix)")
    r.add_argument("--namespace", help="namespace for the jobs")
    r.add_argument("--secret", help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    r.add_argument("--endpoint", help="S3 endpoint URL (MinIO, Ceph, R2)")
    r.add_argument("--region", help="S3 region")
    r.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE", help="override a stage flag (repeatable)")
    r.add_argument("--rl", action=argparse.BooleanOptionalAction, default=None, help="include chat_rl")
    r.add_argument("--only", action="append", metavar="STEP", help="render only this step (repeatable)")
    r.add_argument("--skip", action="append", metavar="STEP", help="leave this step out (repeatable)")
    r.add_argument("--gpus-per-node", type=int, help="GPUs per pod for GPU stages")
    r.add_argument("--nodes", type=int, help="pods per GPU stage")
    r.add_argument("--allow-file-store", action="store_true",
                   help="accept a file:// store (you mount a shared volume at its path in every job yourself)")
    r.add_argument("-o", "--out", metavar="DIR", help="write one numbered file per step into DIR instead of stdout")
    r.set_defaults(func=render)
    c = sub.add_parser("crd", help="print the NanochatRun CustomResourceDefinition")
    c.set_defaults(func=print_crd)
    e = sub.add_parser("example", help="print an example NanochatRun")
    e.add_argument("--name", default="d20-first")
    e.add_argument("--image", help="container image (default: the published nanochat-train image for GPU profiles, nanochat-cpu otherwise)")
    e.add_argument("--profile", default="d20", choices=profiles.names())
    e.add_argument("--store", default="s3://nanochat/runs/d20-first")
    e.set_defaults(func=print_example)
    v = sub.add_parser("validate", help="validate manifests: PyTorchJob / NanochatRun (CRD schemas) and built-in kinds (strict)")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=validate_files)
    i = sub.add_parser("install", help="print the CRD, RBAC and operator Deployment (kubectl apply -f -), for clusters without Helm")
    i.add_argument("--image", required=True, help="image with nanochat-k8s installed (the same image the stages run)")
    i.add_argument("--namespace", default="nanochat-system", help="namespace for the operator")
    i.add_argument("--watch", action="append", metavar="NAMESPACE", help="watch only this namespace (repeatable; default: all)")
    i.add_argument("--metrics-port", type=int, default=8080)
    i.add_argument("--health-port", type=int, default=8081)
    i.set_defaults(func=install)
    o = sub.add_parser("operator", help="run the NanochatRun operator (kopf)")
    o.add_argument("--namespace", action="append", help="watch this namespace (repeatable; default: all)")
    o.add_argument("--interval", type=float, default=10.0, help="seconds between reconcile passes per run")
    o.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics and readiness /readyz port (0 = off)")
    o.add_argument("--health-port", type=int, default=8081, help="kopf's liveness endpoint /healthz port (0 = off)")
    o.set_defaults(func=operator)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
