"""TorchX components: one per nanochat stage, plus a generic `stage` for any stage module.

Each returns an AppDef with one role running `torchrun ... -m nanochat.stages.<module> --store=...
--profile=... <extra flags>` (built by torchx's own `dist.torchrun`, so rendezvous works on every
scheduler), e.g.

    torchx run -s local_cwd operators/torchx_components.py:tok_train --store file:///tmp/run --profile tiny
    torchx run -s local_cwd operators/torchx_components.py:stage --module tests.fake_stages.echo --store file:///tmp/run -- --steps=3
    torchx run -s kubernetes -cfg queue=default operators/torchx_components.py:base_train --store s3://bucket/run --image IMG
    torchx run -s pytorchjob operators/torchx_components.py:base_train --store s3://bucket/run --image IMG

`-s kubernetes` is TorchX's built-in scheduler (needs Volcano); `-s pytorchjob` is ours
(operators.torchx_scheduler, needs only the Kubeflow training operator). Extra stage flags go after
`--`. TorchX reads this file's source to find components, so each is a plain function here.
"""

import os
from typing import Dict, Optional

import torchx.specs as specs
from torchx.components.dist import torchrun

IMAGE = os.environ.get("NANOCHAT_IMAGE", "ghcr.io/nanochat/nanochat:latest")
GPU_PROFILES = ("d20", "d24", "d26")
META_NPROC = "nanochat/nproc-per-node"
META_STAGE = "nanochat/stage"
META_S3_SECRET = "nanochat/s3-secret"


def _app(module: str, args: tuple, store: str, profile: str, image: str, j: str, gpu: int, cpu: int, memMB: int,
         h: Optional[str], env: Optional[Dict[str, str]], max_retries: int, s3_secret: Optional[str],
         endpoint: Optional[str]) -> specs.AppDef:
    module_path = module if "." in module else f"nanochat.stages.{module}"
    stage = module_path.rsplit(".", 1)[-1]
    env = dict(env or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    nproc = j.split("x")[-1] if "x" in j else j
    app = torchrun(f"--store={store}", f"--profile={profile}", *args, m=module_path, image=image,
                   name=f"nanochat-{stage.replace('_', '-')}", h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env,
                   max_retries=max_retries)
    role = app.roles[0]
    role.name = stage.replace("_", "-")
    role.metadata[META_NPROC] = nproc
    role.metadata[META_STAGE] = stage
    if s3_secret:
        role.metadata[META_S3_SECRET] = s3_secret
    return app


def _gpu_defaults(profile: str, j: Optional[str], gpu: Optional[int]) -> tuple[str, int]:
    """GPU stages: 1 node × 8 GPUs on GPU profiles, 1 CPU process otherwise."""
    on_gpu = profile in GPU_PROFILES
    j = j or ("1x8" if on_gpu else "1x1")
    return j, (int(j.split("x")[-1]) if on_gpu else 0) if gpu is None else gpu


def stage(
    *args: str,
    module: str,
    store: str,
    profile: str = "tiny",
    image: str = IMAGE,
    j: str = "1x1",
    gpu: int = 0,
    cpu: int = 2,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    s3_secret: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> specs.AppDef:
    """Any stage module: `nanochat.stages.<module>` (a bare name) or a dotted module path.

    Args:
        args: extra stage flags (--key=value), after `--`
        module: stage module, e.g. base_train or tests.fake_stages.echo
        store: artifact store URI (file:///dir or s3://bucket/prefix)
        profile: nanochat profile (tiny, ci, d20, d24, d26)
        image: container image with nanochat installed (ignored by local_cwd)
        j: {nnodes}x{nproc_per_node}
        gpu: GPUs per node
        cpu: CPUs per node
        memMB: memory per node in MB
        h: a registered named resource (overrides cpu/gpu/memMB)
        env: extra environment variables (K1=v1,K2=v2)
        max_retries: scheduler-level retries
        s3_secret: Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (pytorchjob scheduler)
        endpoint: S3 endpoint URL (AWS_ENDPOINT_URL)
    """
    return _app(module, args, store, profile, image, j, gpu, cpu, memMB, h, env, max_retries, s3_secret, endpoint)


def data(*args: str, store: str, profile: str = "tiny", image: str = IMAGE, cpu: int = 8, memMB: int = 32768,
         env: Optional[Dict[str, str]] = None, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    """Text shards: the embedded corpus (tiny) or FineWeb-Edu shards.

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        cpu: CPUs
        memMB: memory in MB
        env: extra environment variables
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    return _app("data", args, store, profile, image, "1x1", 0, cpu, memMB, None, env, 0, s3_secret, endpoint)


def task_data(*args: str, store: str, profile: str = "d20", image: str = IMAGE, cpu: int = 4, memMB: int = 16384,
              env: Optional[Dict[str, str]] = None, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    """Chat task datasets (SmolTalk, MMLU, GSM8K, ...).

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        cpu: CPUs
        memMB: memory in MB
        env: extra environment variables
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    return _app("task_data", args, store, profile, image, "1x1", 0, cpu, memMB, None, env, 0, s3_secret, endpoint)


def eval_bundle(*args: str, store: str, profile: str = "d20", image: str = IMAGE, cpu: int = 2, memMB: int = 8192,
                env: Optional[Dict[str, str]] = None, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    """Fetch the CORE eval bundle.

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        cpu: CPUs
        memMB: memory in MB
        env: extra environment variables
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    return _app("eval_bundle", args, store, profile, image, "1x1", 0, cpu, memMB, None, env, 0, s3_secret, endpoint)


def tok_train(*args: str, store: str, profile: str = "tiny", image: str = IMAGE, cpu: int = 8, memMB: int = 32768,
              env: Optional[Dict[str, str]] = None, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    """Train the BPE tokenizer.

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        cpu: CPUs
        memMB: memory in MB
        env: extra environment variables
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    return _app("tok_train", args, store, profile, image, "1x1", 0, cpu, memMB, None, env, 0, s3_secret, endpoint)


def tok_eval(*args: str, store: str, profile: str = "tiny", image: str = IMAGE, cpu: int = 4, memMB: int = 16384,
             env: Optional[Dict[str, str]] = None, s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    """Tokenizer compression report.

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        cpu: CPUs
        memMB: memory in MB
        env: extra environment variables
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    return _app("tok_eval", args, store, profile, image, "1x1", 0, cpu, memMB, None, env, 0, s3_secret, endpoint)


def base_train(*args: str, store: str, profile: str = "d20", image: str = IMAGE, j: Optional[str] = None,
               gpu: Optional[int] = None, cpu: int = 64, memMB: int = 512000, h: Optional[str] = None,
               env: Optional[Dict[str, str]] = None, max_retries: int = 0, s3_secret: Optional[str] = None,
               endpoint: Optional[str] = None) -> specs.AppDef:
    """Pretrain the base model (GPU profiles: 1x8 H100 by default).

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        j: {nnodes}x{nproc_per_node} (default 1x8 on GPU profiles, 1x1 otherwise)
        gpu: GPUs per node (default: nproc_per_node on GPU profiles, 0 otherwise)
        cpu: CPUs per node
        memMB: memory per node in MB
        h: a registered named resource
        env: extra environment variables
        max_retries: scheduler-level retries
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    j, gpu = _gpu_defaults(profile, j, gpu)
    return _app("base_train", args, store, profile, image, j, gpu, cpu, memMB, h, env, max_retries, s3_secret, endpoint)


def base_eval(*args: str, store: str, profile: str = "d20", image: str = IMAGE, j: Optional[str] = None,
              gpu: Optional[int] = None, cpu: int = 64, memMB: int = 512000, h: Optional[str] = None,
              env: Optional[Dict[str, str]] = None, max_retries: int = 0, s3_secret: Optional[str] = None,
              endpoint: Optional[str] = None) -> specs.AppDef:
    """Base model evaluation: bpb, samples, CORE.

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        j: {nnodes}x{nproc_per_node}
        gpu: GPUs per node
        cpu: CPUs per node
        memMB: memory per node in MB
        h: a registered named resource
        env: extra environment variables
        max_retries: scheduler-level retries
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    j, gpu = _gpu_defaults(profile, j, gpu)
    return _app("base_eval", args, store, profile, image, j, gpu, cpu, memMB, h, env, max_retries, s3_secret, endpoint)


def mid_train(*args: str, store: str, profile: str = "d20", image: str = IMAGE, j: Optional[str] = None,
              gpu: Optional[int] = None, cpu: int = 64, memMB: int = 512000, h: Optional[str] = None,
              env: Optional[Dict[str, str]] = None, max_retries: int = 0, s3_secret: Optional[str] = None,
              endpoint: Optional[str] = None) -> specs.AppDef:
    """Midtraining: conversations, tool use, multiple choice.

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        j: {nnodes}x{nproc_per_node}
        gpu: GPUs per node
        cpu: CPUs per node
        memMB: memory per node in MB
        h: a registered named resource
        env: extra environment variables
        max_retries: scheduler-level retries
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    j, gpu = _gpu_defaults(profile, j, gpu)
    return _app("mid_train", args, store, profile, image, j, gpu, cpu, memMB, h, env, max_retries, s3_secret, endpoint)


def chat_sft(*args: str, store: str, profile: str = "d20", image: str = IMAGE, j: Optional[str] = None,
             gpu: Optional[int] = None, cpu: int = 64, memMB: int = 512000, h: Optional[str] = None,
             env: Optional[Dict[str, str]] = None, max_retries: int = 0, s3_secret: Optional[str] = None,
             endpoint: Optional[str] = None) -> specs.AppDef:
    """Supervised finetuning.

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        j: {nnodes}x{nproc_per_node}
        gpu: GPUs per node
        cpu: CPUs per node
        memMB: memory per node in MB
        h: a registered named resource
        env: extra environment variables
        max_retries: scheduler-level retries
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    j, gpu = _gpu_defaults(profile, j, gpu)
    return _app("chat_sft", args, store, profile, image, j, gpu, cpu, memMB, h, env, max_retries, s3_secret, endpoint)


def chat_rl(*args: str, store: str, profile: str = "d20", image: str = IMAGE, j: Optional[str] = None,
            gpu: Optional[int] = None, cpu: int = 64, memMB: int = 512000, h: Optional[str] = None,
            env: Optional[Dict[str, str]] = None, max_retries: int = 0, s3_secret: Optional[str] = None,
            endpoint: Optional[str] = None) -> specs.AppDef:
    """RL on GSM8K-style problems.

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        profile: nanochat profile
        image: container image
        j: {nnodes}x{nproc_per_node}
        gpu: GPUs per node
        cpu: CPUs per node
        memMB: memory per node in MB
        h: a registered named resource
        env: extra environment variables
        max_retries: scheduler-level retries
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    j, gpu = _gpu_defaults(profile, j, gpu)
    return _app("chat_rl", args, store, profile, image, j, gpu, cpu, memMB, h, env, max_retries, s3_secret, endpoint)


def chat_eval(*args: str, store: str, source: str = "sft", profile: str = "d20", image: str = IMAGE,
              j: Optional[str] = None, gpu: Optional[int] = None, cpu: int = 64, memMB: int = 512000,
              h: Optional[str] = None, env: Optional[Dict[str, str]] = None, max_retries: int = 0,
              s3_secret: Optional[str] = None, endpoint: Optional[str] = None) -> specs.AppDef:
    """ChatCORE evaluation of a chat checkpoint.

    Args:
        args: extra stage flags (--key=value), after `--`
        store: artifact store URI
        source: which checkpoint: mid, sft or rl
        profile: nanochat profile
        image: container image
        j: {nnodes}x{nproc_per_node}
        gpu: GPUs per node
        cpu: CPUs per node
        memMB: memory per node in MB
        h: a registered named resource
        env: extra environment variables
        max_retries: scheduler-level retries
        s3_secret: Secret with S3 credentials (pytorchjob scheduler)
        endpoint: S3 endpoint URL
    """
    j, gpu = _gpu_defaults(profile, j, gpu)
    return _app("chat_eval", (f"--source={source}", *args), store, profile, image, j, gpu, cpu, memMB, h, env,
                max_retries, s3_secret, endpoint)
