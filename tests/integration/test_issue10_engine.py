"""Issue 10 (engine part) against real host daemons: verification before COMMIT,
one migration per VM, restart recovery, bounded waits and cancel."""

from __future__ import annotations

import time

import pytest

from tests.integration.conftest import Pair, digest, vm_names

pytestmark = pytest.mark.integration


def _dest_job(pair: Pair, name: str) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + 5
    while True:
        job = [j for j in pair.b.get("/v1/jobs") if j["vm"] == name][-1]
        if job["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return job  # type: ignore[no-any-return]
        time.sleep(0.05)


def test_issue10_2_verification_mismatch_fails_before_commit(pair: Pair) -> None:
    pair.create("v-mismatch")
    job = pair.migrate("v-mismatch", fault="active:unlogged-write")
    assert job["status"] == "failed", job
    assert job["step"] == "verification" and "before commit" in job["error"], job
    assert "ram" in job["stats"]["verification"]["differ"]
    vm = pair.a.get("/v1/vms/v-mismatch")
    assert vm["runstate"] == "running"  # the source resumed: COMMIT was never sent
    assert "v-mismatch" not in vm_names(pair.b)
    dest = _dest_job(pair, "v-mismatch")
    assert dest["status"] == "failed" and "source aborted" in dest["error"], dest
    # and the VM still migrates afterwards, verified
    before = digest(pair.a, "v-mismatch")
    job = pair.migrate("v-mismatch")
    assert job["status"] == "completed" and job["stats"]["verification"]["verified"], job
    assert digest(pair.b, "v-mismatch")["ram"] == before["ram"]
    pair.b.delete("/v1/vms/v-mismatch")
