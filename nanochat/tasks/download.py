"""
Fetch the public task datasets (the Hugging Face parquet exports, plus two plain files) into a store:

    download_task_data(store, ["gsm8k", "mmlu", "arc_easy"])
    python -m nanochat.tasks.download --store s3://bucket/run gsm8k mmlu

Files land at <store>/data/tasks/<dir>/<path in the dataset repo>, the layout the task loaders
read. Downloads are pinned to a revision; a file with a known sha256 is verified (a mismatch is
retried, then an error), and every file's sha256, size and URL go to data/tasks/<dir>/index.json.
Re-running skips files whose stored bytes still match the index (resumable). Each file goes through
nanochat.download: transient failures (5xx, 429, resets, timeouts) are retried with exponential
backoff; 404 and other 4xx fail at once with the URL in the message.

Base URLs are overridable (mirrors, or a local server in tests): `base_url` replaces the Hugging
Face endpoint ($HF_ENDPOINT is honoured, like huggingface_hub), `mirrors` maps any other default
base URL to a replacement.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass

from nanochat.download import BACKOFF, RETRIES, TIMEOUT, DownloadError, NotFound, fetch, hf_datasets_url, stored_sha256
from nanochat.errors import Failure
from nanochat.tasks.files import TASKS_PREFIX, resolve_store

log = logging.getLogger("nanochat")

HF_DEFAULT = hf_datasets_url()
GITHUB_RAW = "https://raw.githubusercontent.com"
KARPATHY_S3 = "https://karpathy-public.s3.us-west-2.amazonaws.com"


class TaskDownloadError(Failure):
    """A download that failed for good; the message names the URL and the reason."""


@dataclass(frozen=True)
class Source:
    """One downloadable dataset: files from a Hugging Face dataset repo at a revision, or plain URLs."""
    dir: str                                  # data/tasks/<dir>/ in the store
    files: dict[str, str | None]              # path -> expected sha256 (None: recorded on first download)
    repo: str | None = None                   # Hugging Face dataset repo, e.g. "openai/gsm8k"
    revision: str = "main"
    base: str = HF_DEFAULT                    # default base URL of plain files (repo is None)
    license: str = ""

    def url(self, path: str, base_url: str, mirrors: dict[str, str]) -> str:
        if self.repo is not None:
            return f"{base_url.rstrip('/')}/{self.repo}/resolve/{self.revision}/{path}"
        base = mirrors.get(self.base, self.base)
        return f"{base.rstrip('/')}/{path}"


# The real exports, pinned. Revisions and digests as published on the Hub (sha256 of the LFS objects).
SOURCES: dict[str, Source] = {
    "gsm8k": Source("gsm8k", {
        "main/train-00000-of-00001.parquet": "ea82612ea9582142387730c793eb67d3b12849002bc0b7fa6f8efafa7351419d",
        "main/test-00000-of-00001.parquet": "ee7b8da9e381df27b9e3f7758a159ab2bdaa4dbaa910546cbbc47e0cb44e4f59",
    }, repo="openai/gsm8k", revision="740312add88f781978c0658806c59bc2815b9866", license="MIT"),
    "mmlu": Source("mmlu", {
        "all/test-00000-of-00001.parquet": "74a41822ce7d3def56e1682f958469c04642a5336a5ce912fa375fdb90fb25d7",
        "all/validation-00000-of-00001.parquet": None,
        "all/dev-00000-of-00001.parquet": None,
    }, repo="cais/mmlu", revision="c30699e8356da336a370243923dbaf21066bb9fe", license="MIT"),
    "mmlu_aux": Source("mmlu", {
        "auxiliary_train/train-00000-of-00001.parquet": "ae6662576ef989fed82a9289da1b89e950499c320f6849b052ec344dfcb709eb",
    }, repo="cais/mmlu", revision="c30699e8356da336a370243923dbaf21066bb9fe", license="MIT"),
    "arc_easy": Source("arc", {
        "ARC-Easy/train-00000-of-00001.parquet": "b315db8a4be597dc7daa50a4e70d48dd7c990c32085629e6ccd8c926beaa80b5",
        "ARC-Easy/validation-00000-of-00001.parquet": "ed890ff1e4cef7a7140d3a30dcea3ed2c9d467c6458f447ad9ef0176d8dcbb74",
        "ARC-Easy/test-00000-of-00001.parquet": "4160597d618ae851c7eb04e281574f3f654776216ac6b6641588d64527b47177",
    }, repo="allenai/ai2_arc", revision="210d026faf9955653af8916fad021475a3f00453", license="CC-BY-SA-4.0"),
    "arc_challenge": Source("arc", {
        "ARC-Challenge/train-00000-of-00001.parquet": "e488c1587ffdcfc8443f916c53488a95cd471c5790e0746c6bfe4cecf20962cb",
        "ARC-Challenge/validation-00000-of-00001.parquet": "395a5c88d1580d69855fbaee9450270578df1ad5af6259771cd0a42c20e99f05",
        "ARC-Challenge/test-00000-of-00001.parquet": "62f03257e737aed263f55c6abf87c7bb0028a44a6bdd2a26eb1279eb42c1d1e9",
    }, repo="allenai/ai2_arc", revision="210d026faf9955653af8916fad021475a3f00453", license="CC-BY-SA-4.0"),
    "smoltalk": Source("smoltalk", {
        "data/train-00000-of-00004.parquet": "498cd4580014f42c40cfde066573564ed28e3e1548a5566715b615f5ea932856",
        "data/train-00001-of-00004.parquet": "5412c03df579fc7dd7d06c7f5249627d99d0621882fb8f2cd5c13582eb2a80f6",
        "data/train-00002-of-00004.parquet": "aefcac6571abf275b4e1629baa01f326c0fe279d35cd0349b7439319923815a7",
        "data/train-00003-of-00004.parquet": "c15edfca888c9924a626dad7b7f4e9f08d8f406f997ac13be46bc9be0a6192db",
        "data/test-00000-of-00001.parquet": "be6773dcce145f3918ff14237b1f765affa427b0b13f6a02d397e665ac908b9a",
    }, repo="HuggingFaceTB/smol-smoltalk", revision="f73fe857d519ff6ac5af2ea67c4d3834da7b8bcc", license="Apache-2.0"),
    "humaneval": Source("humaneval", {
        "openai_humaneval/test-00000-of-00001.parquet": "2f2871a15fbc95b6c683043359f4ed8e144c5a1c4f24f25f66bc51f598dfcfb6",
    }, repo="openai/openai_humaneval", revision="7dce6050a7d6d172f3cc5c32aa97f52fa1a2e544", license="MIT"),
    # dwyl/english-words (The Unlicense): words_alpha.txt inside a zip, pinned to a commit
    "spellingbee": Source("spellingbee", {
        "dwyl/english-words/20f5cc9b3f0ccc8ce45d814c532b7c2031bba31c/words_alpha.zip": "84e2f80ebb4ef498dac7e0940893efc4d14ca90262370656b6155fb065839b5f",
    }, base=GITHUB_RAW, license="Unlicense"),
    # nanochat's identity conversations (MIT); the file is not versioned, so no digest is pinned
    "identity": Source("identity", {"identity_conversations.jsonl": None}, base=KARPATHY_S3, license="MIT"),
}
ALIASES = {"arc": ("arc_easy", "arc_challenge"), "mmlu_auxiliary_train": ("mmlu_aux",),
           "simple_spelling": ("spellingbee",), "identity_conversations": ("identity",)}


def store_key(source: Source, path: str) -> str:
    # plain-file sources keep only the file name (words_alpha.zip), HF files keep their repo path
    name = path if source.repo is not None else path.rsplit("/", 1)[-1]
    return f"{TASKS_PREFIX}/{source.dir}/{name}"


def resolve_names(names, sources: dict[str, Source]) -> list[str]:
    out = []
    for name in names:
        key = name.strip().lower().replace("-", "_")
        for resolved in ALIASES.get(key, (key,)):
            if resolved not in sources:
                raise KeyError(f"no download source for task {name!r}; known: {', '.join(sorted(sources))}")
            if resolved not in out:
                out.append(resolved)
    return out


def download_task_data(store, names, base_url: str = HF_DEFAULT, mirrors: dict[str, str] | None = None,
                       retries: int = RETRIES, backoff: float = BACKOFF, timeout: float = TIMEOUT,
                       sources: dict[str, Source] | None = None, verify_existing: bool = True) -> dict[str, dict]:
    """Download the named tasks' files into the store. Returns {store key: {sha256, size, url, skipped}}."""
    store = resolve_store(store)
    sources = SOURCES if sources is None else sources
    mirrors = mirrors or {}
    report = {}
    for name in resolve_names(names, sources):
        source = sources[name]
        index_key = f"{TASKS_PREFIX}/{source.dir}/index.json"
        index = store.get_json_or(index_key, {}) or {}
        for path, expected in source.files.items():
            key = store_key(source, path)
            url = source.url(path, base_url, mirrors)
            entry = index.get(key)
            if entry and _still_valid(store, key, entry, expected, verify_existing):
                log.info("task data: %s already present (sha256 %s…), skipping", store.uri(key), entry["sha256"][:12])
                report[key] = {**entry, "skipped": True}
                continue
            token = os.environ.get("HF_TOKEN") if source.repo is not None else None
            entry = _fetch_to_store(store, key, url, expected, retries, backoff, timeout, token)
            entry.update(source=name, revision=source.revision if source.repo else None, license=source.license)
            index[key] = entry
            store.put_json(index_key, index)  # after each file: a crash later keeps what is done
            report[key] = {**entry, "skipped": False}
    return report


def _still_valid(store, key, entry, expected, verify) -> bool:
    if expected is not None and entry.get("sha256") != expected:
        return False  # the pin changed since this file was fetched
    if not store.exists(key):
        return False
    return not verify or stored_sha256(store, key) == entry.get("sha256")


def _fetch_to_store(store, key, url, expected, retries, backoff, timeout, token=None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        got = fetch(url, store, key, expected, retries, backoff, timeout, headers=headers)
    except NotFound as e:
        raise TaskDownloadError(f"{e} — check the dataset path/revision or the base URL") from None
    except DownloadError as e:
        gated = " (the dataset may be gated: set HF_TOKEN or use a mirror)" if e.status in (401, 403) else ""
        raise TaskDownloadError(f"{e}{gated}") from None
    log.info("task data: %s -> %s (%d bytes, sha256 %s…)", url, store.uri(key), got.size, got.sha256[:12])
    return {"sha256": got.sha256, "size": got.size, "url": url, "downloaded": time.time()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanochat.tasks.download", description="Download task datasets into a store.")
    parser.add_argument("names", nargs="*", help=f"tasks to fetch (default: all): {', '.join(sorted(SOURCES))}")
    parser.add_argument("--store", default=None, help="store URI (default: $NANOCHAT_STORE or the local default)")
    parser.add_argument("--base-url", default=HF_DEFAULT, help="Hugging Face datasets base URL (a mirror)")
    parser.add_argument("--retries", type=int, default=RETRIES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    report = download_task_data(args.store, args.names or list(SOURCES), base_url=args.base_url, retries=args.retries)
    fetched = sum(not r["skipped"] for r in report.values())
    print(f"{len(report)} files ready ({fetched} downloaded, {len(report) - fetched} already present)")


if __name__ == "__main__":
    main()
