"""Fetch the CORE eval bundle (DCLM tasks reformatted by MosaicML, as nanochat ships it) into the store:
eval_bundle.zip -> data/eval_bundle/{core.yaml, eval_meta_data.csv, eval_data/**.jsonl, manifest.json}.

Retries with backoff, resumes a partial download, records the zip's sha256; already there = no download."""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.config import ConfigError, StageConfig, opt
from nanochat.core_eval import BUNDLE_PREFIX, EVAL_BUNDLE_URL, MANIFEST, RETRIES
from nanochat.stage import run_module_main, stage_main

STAGE = "eval_bundle"


@dataclass
class Config(StageConfig):
    url: str = opt(EVAL_BUNDLE_URL, "where eval_bundle.zip is fetched from (override for a mirror)", hash=False)
    sha256: str = opt("", "expected sha256 of the zip (empty = record it, do not check)")
    retries: int = opt(RETRIES, "retries of a failed download (exponential backoff)", hash=False)

    def validate(self):
        if not self.url.startswith(("http://", "https://", "file://")):
            raise ConfigError(f"--url must be an http(s):// or file:// URL, got {self.url!r}")
        if self.sha256 and (len(self.sha256) != 64 or self.sha256.strip("0123456789abcdef")):
            raise ConfigError(f"--sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.retries < 0:
            raise ConfigError("--retries must be >= 0")


def run(ctx):
    from nanochat.core_eval import bundle_summary, download_eval_bundle
    from nanochat.store import sha256_bytes
    cfg = ctx.cfg
    if ctx.is_master:  # one process writes; others (if any) only wait at the final barrier
        doc = download_eval_bundle(ctx.store, cfg.url, sha256=cfg.sha256 or None, force=cfg.force, retries=cfg.retries)
        meta = doc.get("meta", {})
        ctx.log(("already in the store" if doc["skipped"] else "fetched") + f": {len(doc['files'])} files, zip sha256 {meta.get('zip_sha256')}")
        tasks = bundle_summary(ctx.store)
        ctx.add_artifact(f"{BUNDLE_PREFIX}/{MANIFEST}", sha256_bytes(ctx.store.get_bytes(f"{BUNDLE_PREFIX}/{MANIFEST}")))
        ctx.section("CORE eval bundle", [
            {"source": meta.get("url", cfg.url), "zip sha256": meta.get("zip_sha256", ""), "zip bytes": meta.get("zip_size", 0),
             "files": len(doc["files"]), "tasks": len(tasks), "downloaded": not doc["skipped"]},
            tasks])
        return {"files": len(doc["files"]), "tasks": len(tasks), "zip_sha256": meta.get("zip_sha256", ""),
                "zip_bytes": meta.get("zip_size", 0), "downloaded": not doc["skipped"]}
    return {}


def main(argv=None):
    return stage_main(STAGE, Config, run, argv)


if __name__ == "__main__":
    run_module_main(STAGE, Config, run)
