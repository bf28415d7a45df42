"""TorchX components: one per nanochat stage module (nanochat.pipeline.STEPS), plus `stage` for any module.

Each returns an AppDef with one role running `torchrun ... -m nanochat.stages.<module> --store=...
--profile=... <extra flags>` (built by torchx's own `dist.torchrun`, so rendezvous works on every
scheduler), e.g.

    torchx run -s local_cwd operators/torchx_components.py:tok_train --store file:///tmp/run --profile tiny
    torchx run -s local_cwd operators/torchx_components.py:stage --module tests.fake_stages.echo --store file:///tmp/run -- --steps=3
    torchx run -s kubernetes -cfg queue=default operators/torchx_components.py:base_train --store s3://bucket/run --image IMG
    torchx run -s pytorchjob operators/torchx_components.py:base_train --store s3://bucket/run --image IMG

`-s kubernetes` is TorchX's built-in scheduler (needs Volcano); `-s pytorchjob` is ours
(operators.torchx_scheduler, needs only the Kubeflow training operator). Extra stage flags go after
`--`.

TorchX finds a component by parsing this file for a `def NAME` with typed arguments, so every stage
keeps a one-line wrapper here; everything else comes from the pipeline and the profiles in
`_stage_app`: whether the stage uses GPUs, nodes x processes per node, and the help text.
tests/test_k8s_torchx.py checks that every stage module in pipeline.STEPS has its wrapper.
"""

import inspect
import os
from typing import Dict, Optional

import torchx.specs as specs
from torchx.components.dist import torchrun

from nanochat import pipeline, profiles
from operators.crd import default_image

IMAGE = os.environ.get("NANOCHAT_IMAGE", default_image(gpu=True))  # the CUDA image runs every stage
META_NPROC = "nanochat/nproc-per-node"
META_STAGE = "nanochat/stage"
META_S3_SECRET = "nanochat/s3-secret"
GPU_MODULES = {s.module for s in pipeline.STEPS if s.gpu}
ARG_HELP = {  # one help text per argument, shared by every component
    "args": "extra stage flags (--key=value), after `--`",
    "module": "stage module, e.g. base_train or tests.fake_stages.echo",
    "store": "artifact store URI (file:///dir or s3://bucket/prefix)",
    "source": "which checkpoint to evaluate: base, mid, sft or rl",
    "profile": f"nanochat profile ({', '.join(profiles.names())})",
    "image": "container image with nanochat installed (ignored by local_cwd)",
    "j": "{nnodes}x{nproc_per_node} (default: the profile's nodes and processes for the stage)",
    "gpu": "GPUs per node (default: one per process for GPU stages on GPU profiles, else 0)",
    "cpu": "CPUs per node",
    "memMB": "memory per node in MB",
    "h": "a registered named resource (overrides cpu/gpu/memMB)",
    "env": "extra environment variables (K1=v1,K2=v2)",
    "max_retries": "scheduler-level retries",
    "s3_secret": "Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (pytorchjob scheduler)",
    "endpoint": "S3 endpoint URL (AWS_ENDPOINT_URL)",
}


def placement(module: str, profile: str) -> tuple[str, int]:
    """(j, gpus per node) the way the operator places a stage: GPU stages take the profile's nodes and
    one process per GPU; CPU profiles run them as the profile's processes (usually 1) on one node."""
    prof = profiles.get(profile)
    gpu_stage = module in GPU_MODULES
    nproc = profiles.nproc(profile, module) if gpu_stage else 1
    if gpu_stage and prof.get("gpus_per_node", 0) > 0:
        return f"{prof.get('nodes', 1)}x{prof['gpus_per_node']}", prof["gpus_per_node"]
    return f"1x{nproc}", 0


def _stage_app(module: str, args: tuple, *, store: str, profile: str, image: str, j: Optional[str], gpu: Optional[int],
               cpu: int, memMB: int, h: Optional[str], env: Optional[Dict[str, str]], max_retries: int,
               s3_secret: Optional[str], endpoint: Optional[str], source: Optional[str] = None) -> specs.AppDef:
    """What every component builds; the wrappers below pass their arguments through (`**locals()`)."""
    module_path = module if "." in module else f"nanochat.stages.{module}"
    stage = module_path.rsplit(".", 1)[-1]
    default_j, default_gpu = placement(module, profile) if module in pipeline.MODULES else ("1x1", 0)
    j = j or default_j
    gpu = default_gpu if gpu is None else gpu
    env = dict(env or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    flags = (f"--source={source}",) if source else ()
    app = torchrun(f"--store={store}", f"--profile={profile}", *flags, *args, m=module_path, image=image,
                   name=f"nanochat-{stage.replace('_', '-')}", h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env,
                   max_retries=max_retries)
    role = app.roles[0]
    role.name = stage.replace("_", "-")
    role.metadata[META_NPROC] = j.split("x")[-1]
    role.metadata[META_STAGE] = stage
    if s3_secret:
        role.metadata[META_S3_SECRET] = s3_secret
    return app


def _documented(fn):
    """Google-style docstring (what `torchx run ... --help` prints): the wrapper's own summary, else the
    pipeline's description of its stage, then the shared help of each argument."""
    steps = [s for s in pipeline.STEPS if s.module == fn.__name__]
    summary = (fn.__doc__ or "").strip() or (steps[0].description[:1].upper() + steps[0].description[1:] + ".")
    params = "\n".join(f"    {name}: {ARG_HELP[name]}" for name in inspect.signature(fn).parameters)
    fn.__doc__ = f"{summary}\n\nArgs:\n{params}\n"
    return fn


@_documented
def stage(*args: str, module: str, store: str, profile: str = "tiny", image: str = IMAGE, j: Optional[str] = None,
          gpu: Optional[int] = None, cpu: int = 2, memMB: int = 4096, h: Optional[str] = None,
          env: Optional[Dict[str, str]] = None, max_retries: int = 0, s3_secret: Optional[str] = None,
          endpoint: Optional[str] = None) -> specs.AppDef:
    """Any stage module: `nanochat.stages.<module>` (a bare name) or a dotted module path."""
    return _stage_app(**locals())


# ----------------------------------------------------------------------------- one wrapper per stage module

@_documented
def data(*args: str, store: str, profile: str = "tiny", image: str = IMAGE, cpu: int = 8, memMB: int = 32768,
         j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
         max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("data", **locals())


@_documented
def task_data(*args: str, store: str, profile: str = "d20", image: str = IMAGE, cpu: int = 4, memMB: int = 16384,
              j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
              max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("task_data", **locals())


@_documented
def eval_bundle(*args: str, store: str, profile: str = "d20", image: str = IMAGE, cpu: int = 2, memMB: int = 8192,
                j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("eval_bundle", **locals())


@_documented
def tok_train(*args: str, store: str, profile: str = "tiny", image: str = IMAGE, cpu: int = 8, memMB: int = 32768,
              j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
              max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("tok_train", **locals())


@_documented
def tok_eval(*args: str, store: str, profile: str = "tiny", image: str = IMAGE, cpu: int = 4, memMB: int = 16384,
             j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
             max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("tok_eval", **locals())


@_documented
def base_train(*args: str, store: str, profile: str = "d20", image: str = IMAGE, cpu: int = 64, memMB: int = 512000,
               j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
               max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("base_train", **locals())


@_documented
def base_eval(*args: str, store: str, profile: str = "d20", image: str = IMAGE, cpu: int = 64, memMB: int = 512000,
              j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
              max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("base_eval", **locals())


@_documented
def mid_train(*args: str, store: str, profile: str = "d20", image: str = IMAGE, cpu: int = 64, memMB: int = 512000,
              j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
              max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("mid_train", **locals())


@_documented
def chat_sft(*args: str, store: str, profile: str = "d20", image: str = IMAGE, cpu: int = 64, memMB: int = 512000,
             j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
             max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("chat_sft", **locals())


@_documented
def chat_rl(*args: str, store: str, profile: str = "d20", image: str = IMAGE, cpu: int = 64, memMB: int = 512000,
            j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
            max_retries: int = 0, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    return _stage_app("chat_rl", **locals())


@_documented
def chat_eval(*args: str, store: str, source: str = "sft", profile: str = "d20", image: str = IMAGE, cpu: int = 64,
              memMB: int = 512000, j: Optional[str] = None, gpu: Optional[int] = None, h: Optional[str] = None,
              env: Optional[Dict[str, str]] = None, max_retries: int = 0, s3_secret: Optional[str] = None,
              endpoint: Optional[str] = None) -> specs.AppDef:
    """ChatCORE (GPU profiles) or synthetic-task accuracy (CPU profiles) of one checkpoint."""
    return _stage_app("chat_eval", **locals())
