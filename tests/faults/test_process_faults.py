"""Process faults on base_train (CPU fp32, fixed seed): one rank of a 2-rank torchrun job SIGKILLed mid-step, and
SIGTERM, then SIGTERM + SIGKILL, arriving while a checkpoint is being uploaded. Every run ends with exactly the
weights of an uninterrupted run (torch.equal), redoes at most save_every steps and never shows a half-written
checkpoint. (SIGTERM/SIGKILL between checkpoints, 1 and 2 ranks: tests/test_base_train.py; a runner killed
mid-stage adopting its stage: tests/test_runner.py.)"""
from __future__ import annotations

from tests.faults.harness import SAVE_EVERY, sigkill_during_checkpoint_write, sigkill_one_rank, sigterm_during_checkpoint_write


def test_sigkill_of_one_rank_fails_the_job_cleanly_and_the_rerun_resumes_bit_exact(lab):
    """Rank 0 (the one that writes meta.json) dies mid-step: rank 1 stops with one line (no traceback), torchrun
    exits non-zero, no done.json, every visible checkpoint whole; the re-run resumes from the newest one and matches a 2-rank run."""
    r = sigkill_one_rank(lab, rank=0)
    assert r.ok, r.explain()
    assert int(r.steps_redone) <= SAVE_EVERY and r.data_lost == "none"


def test_sigterm_during_a_checkpoint_write_completes_that_checkpoint_and_redoes_nothing(lab):
    """The upload of checkpoint 10's model.pt is held at the S3 proxy when SIGTERM arrives: the save finishes
    (it is shielded from the signal), the stage exits 143 at step 10, the re-run starts at step 10."""
    r = sigterm_during_checkpoint_write(lab)
    assert r.ok, r.explain()
    assert r.steps_redone == "0"


def test_grace_period_expiring_mid_checkpoint_write_falls_back_to_the_previous_checkpoint(lab):
    """SIGTERM, then SIGKILL while model.pt is still uploading (it never lands): checkpoint 10 has no meta.json so
    it is invisible; the re-run resumes from checkpoint 5, redoes 5 steps, ends bit-exact."""
    r = sigkill_during_checkpoint_write(lab)
    assert r.ok, r.explain()
    assert r.steps_redone == str(SAVE_EVERY)
