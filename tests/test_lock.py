"""constraints.txt, the versions `make setup` and the images install: it covers every dependency pyproject.toml names,
within its range, and setup uses it (falling back to the newest versions when PyPI no longer serves one)."""

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        assert m, f"constraints.txt: not a name==version pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"constraints.txt pins {name} twice"
        out[name] = m.group(2)
    return out


def project_requirements() -> list[Requirement]:
    deps = PYPROJECT["project"]["dependencies"] + sum(PYPROJECT["project"]["optional-dependencies"].values(), [])
    return [Requirement(d) for d in deps]


def test_every_dependency_is_pinned_within_its_range():
    pinned, env = pins(), default_environment()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name in ("torch", "triton"):
            continue  # the Makefile pins torch (the CPU wheel), which brings its triton; images bring their own
        if req.marker is not None and not any(req.marker.evaluate(dict(env, extra=e)) for e in ("", "dev")):
            continue
        assert name in pinned, f"{req.name} is in pyproject.toml but not in constraints.txt: run `make lock`"
        assert req.specifier.contains(pinned[name], prereleases=True), f"constraints.txt {name}=={pinned[name]} is outside {req}"


def test_the_lock_leaves_torch_and_our_packages_to_the_makefile():
    pinned = pins()
    assert not {"torch", "triton", "nanochat-k8s", "rustbpe"} & set(pinned)
    # kubernetes and botocore resolve only with dateutil 2.x (without the pin pip backtracks for an hour)
    assert int(pinned["python-dateutil"].split(".")[0]) < 3


def test_setup_installs_the_lock_and_falls_back_when_it_cannot():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^LOCK\s*:=\s*constraints.txt$", makefile, re.M)
    installed = makefile.split("$(VENV)/.installed:")[1].split("\n\n")[0]
    pinned_installs = re.findall(r"pip install -q -c \$\(LOCK\) \$\((DEPS|PROJECT)\)", installed)
    assert pinned_installs == ["DEPS", "PROJECT"], installed
    fallback = installed.split("|| {", 1)[1].split("}", 1)[0]
    assert "resolving the newest instead" in fallback and " -c " not in fallback and "$(PROJECT)" in fallback
    assert "$(wildcard $(LOCK))" in installed.splitlines()[0]  # a changed lock re-runs setup
