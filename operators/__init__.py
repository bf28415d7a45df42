"""Kubernetes layer of nanochat: the NanochatRun CRD, PyTorchJob rendering and validation, the kopf
operator, its metrics, the `nanochat-k8s` CLI, and TorchX components + a PyTorchJob TorchX scheduler.

`nanochat` never imports this package; this package imports `nanochat` (pipeline, profiles, store, report).
"""
