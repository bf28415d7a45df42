"""Storage faults: S3 that fails, stalls, resets and truncates at random (seeded) while base_train reads shards and
writes checkpoints: the run completes with a fault-free run's weights and nothing partial is ever visible. Fatal
problems (missing bucket, bad credentials, a policy that denies writes, unreachable endpoint, full disk) end the
stage with one clear error line and no traceback."""
from __future__ import annotations

import threading

import pytest

from nanochat.dataloader import DataLoader
from nanochat.store import DigestMismatch, open_store
from nanochat.tokenizer import get_tokenizer
from tests.faults import harness as h


def test_base_train_completes_through_random_s3_faults_with_identical_weights(lab):
    r = h.s3_chaos(lab, seed=1, rate=0.1)
    assert r.ok, r.explain()


def test_dataloader_through_s3_faults_yields_exactly_the_fault_free_batches(lab):
    """pyarrow's S3 reads (HEAD, ranged GETs) retried through 503s, resets and truncated bodies: byte-identical batches."""
    clean = open_store(f"file://{lab.prepared}")
    tokenizer = get_tokenizer(clean)
    uri, _ = lab.s3_store("loader-chaos")
    proxy = lab.s3.proxy(h.chaos_policy(seed=3, rate=0.15, actions=h.TRANSIENT[:-1]))  # no delays: keep it quick
    faulty = lab.s3.store(uri, endpoint=proxy.url)
    expected = [x.clone() for x, _ in DataLoader(clean, tokenizer, "train", 4, 64, tokenizer_threads=1).take(40)]
    with h.patched_env(lab.s3.env(proxy.url)):  # pyarrow's S3 filesystem reads the credentials from boto3's session
        loader = DataLoader(faulty, tokenizer, "train", 4, 64, tokenizer_threads=1)
        got = [x.clone() for x, _ in loader.take(40)]
        loader.close()
    assert len(got) == len(expected) and all((a == b).all() for a, b in zip(got, expected))
    assert any("/data/shards/shard_" in path for _, path, _ in proxy.injected), proxy.injected


def test_artifacts_published_through_s3_faults_are_never_seen_partial(lab, tmp_path):
    """A reader polling while artifacts are published through the faulty proxy only ever sees complete artifacts:
    a manifest implies every file it names exists with its digest."""
    uri = f"s3://{lab.s3.bucket()}/pub"
    proxy = lab.s3.proxy(h.chaos_policy(seed=5, rate=0.2, actions=h.TRANSIENT[:-1]))
    writer = lab.s3.store(uri, endpoint=proxy.url)
    reader = lab.s3.store(uri)
    files = {f"part{i}.bin": bytes([i]) * (50_000 + i) for i in range(4)}
    seen, problems, stop = [], [], threading.Event()

    def poll():
        while not stop.is_set():
            for n in range(6):
                doc = reader.read_manifest(f"artifacts/{n}")
                if doc is None:
                    continue
                seen.append(n)
                for name, entry in doc["files"].items():
                    try:
                        reader.get_artifact_file(f"artifacts/{n}", name, tmp_path / f"{n}-{name}")
                    except Exception as e:  # noqa: BLE001 - any failure is a partial artifact
                        problems.append(f"{n}/{name}: {e}")
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    for n in range(6):
        writer.publish(f"artifacts/{n}", files, meta={"n": n})
    stop.set()
    thread.join()
    assert not problems, problems
    assert proxy.faults > 0 and seen
    assert h.audit(reader) == []
    reader.put_bytes("artifacts/0/part1.bin", b"tampered")
    assert h.audit(reader) and "part1.bin" in h.audit(reader)[0]
    with pytest.raises(DigestMismatch, match="artifacts/0/part1.bin"):
        reader.get_artifact_file("artifacts/0", "part1.bin", tmp_path / "x")


@pytest.mark.parametrize("scenario", ["missing_bucket", "bad_credentials", "denied_mid_run", "endpoint_unreachable", "disk_full"])
def test_fatal_store_problems_are_one_clear_error_line(lab, scenario):
    r = {"missing_bucket": lambda: h.missing_bucket(lab),
         "bad_credentials": lambda: h.access_denied(lab),
         "denied_mid_run": lambda: h.access_denied(lab, mid_run=True),
         "endpoint_unreachable": lambda: h.endpoint_unreachable(lab),
         "disk_full": lambda: h.disk_full(lab)}[scenario]()
    assert r.ok, r.explain()
    assert r.message.startswith("nanochat stage base_train: error: ")
    assert r.exit_code in (1, 2)


def test_full_scratch_disk_is_one_clear_error_line(lab):
    r = h.scratch_full(lab)
    assert r.ok, r.explain()
    assert "(TMPDIR) is full" in r.message


def test_file_transfers_retry_past_botocores_own_attempts_and_map_denials(lab, tmp_path):
    """upload_file/download_file wrap S3 errors (S3UploadFailedError, RetriesExceededError): the store still retries
    a burst of 503s longer than botocore's 3 attempts, and a 403 is AccessDenied naming the object."""
    from nanochat.store import AccessDenied, sha256_file
    uri = f"s3://{lab.s3.bucket()}/files"
    burst = {"PUT": 5, "GET": 5}

    def policy(method, path, n):
        if path.split("?")[0].endswith("/big.bin") and burst.get(method, 0) > 0:
            burst[method] -= 1
            return ("status", 503, "SlowDown") if method == "PUT" else "truncate"
        return None
    proxy = lab.s3.proxy(policy)
    store = lab.s3.store(uri, endpoint=proxy.url)
    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * 4000)
    assert store.put_file("big.bin", src) == sha256_file(src)
    assert store.get_file("big.bin", tmp_path / "back.bin", sha256=sha256_file(src)) == sha256_file(src)
    assert burst == {"PUT": 0, "GET": 0} and len(proxy.injected) == 10
    denied = lab.s3.proxy(lambda m, p, n: ("status", 403, "AccessDenied") if m == "PUT" else None)
    with pytest.raises(AccessDenied, match=f"S3 denied upload on {uri}/big.bin"):
        lab.s3.store(uri, endpoint=denied.url).put_file("big.bin", src)
