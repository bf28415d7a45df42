"""nanochat-k8s: the nanochat LLM pipeline, from laptop CPU to Kubernetes."""


def version() -> str:
    """The installed package's version (pyproject.toml), for --version and reports."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed("nanochat-k8s")
    except PackageNotFoundError:  # a source tree that was never pip-installed
        return "unknown"
