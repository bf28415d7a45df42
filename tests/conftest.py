"""Shared fixtures: an isolated environment, file:// and real-S3 (moto on 127.0.0.1) stores."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.s3util import MotoServer  # noqa: E402

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test touches ~/.cache, real AWS config, or leaves temp files outside its tmp dir."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nanochat-base"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for k in [k for k in os.environ if k.startswith("NANOCHAT_") and k not in ("NANOCHAT_BASE_DIR",)]:
        monkeypatch.delenv(k)
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    yield


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    return moto_server


def make_bucket(endpoint: str, name: str | None = None) -> str:
    import boto3
    name = name or f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_uri(s3_env):
    return f"s3://{make_bucket(s3_env.url)}/run1"


@pytest.fixture(params=["file", "s3"])
def store_uri(request, tmp_path):
    """The same test against a local folder and a real S3 server on loopback."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("s3_uri")
