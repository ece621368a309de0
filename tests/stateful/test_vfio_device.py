"""Random set_state / read / write / close / run / reset sequences against the invariants."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from vmferry.hw.vfio import DataStream, DeviceState, VfioError, path
from vmferry.hw.vfio.fsm import ARCS, Session
from vmferry.hw.vfio.states import supported
from vmferry.testing.vfio import make

S = DeviceState
TARGETS = st.sampled_from([*DeviceState, 8])


class VfioDeviceMachine(RuleBasedStateMachine):
    streams = Bundle("streams")
    faults: tuple[str, ...] = ()

    @initialize(kind=st.sampled_from(["mlx5", "pds", "pds_p2p", "hisi_acc"]))
    def setup(self, kind: str) -> None:
        self.dev = make(kind, faults=list(self.faults))
        assert self.dev.driver is not None
        self.driver = self.dev.driver
        self.all: list[DataStream] = []

    @rule(target=streams, new=TARGETS)
    def set_state(self, new: int) -> object:
        cur = self.dev.state
        flags = int(self.dev.migration_flags)
        seen = len(self.driver.arcs_seen)
        try:
            expected = path(flags, cur, new) if cur != S.ERROR else None
        except VfioError:
            expected = None
        try:
            stream = self.dev.set_state(new)
        except VfioError as exc:
            hops = [b for _, b in self.driver.arcs_seen[seen:]]
            if expected is None:
                assert exc.errno in (errno.EINVAL, errno.EIO) and not hops
                assert self.dev.state == cur
            else:  # a hop failed (resume validation): state = last hop that completed
                assert hops == expected[: len(hops)] and self.dev.state != new
                assert self.dev.state == ([cur, *hops][-2] if hops else cur)
            return multiple()
        assert expected is not None and self.dev.state == new
        assert [b for _, b in self.driver.arcs_seen[seen:]] == expected
        last = (([cur, *expected])[-2], new) if expected else None
        opens = last is not None and ARCS[last] in (Session.OPEN_SAVING, Session.OPEN_RESUMING)
        assert (stream is not None) == opens
        if stream is None:
            return multiple()
        assert all(stream is not s for s in self.all)  # never reused
        self.all.append(stream)
        return stream

    @rule(stream=streams, n=st.integers(0, 5000))
    def read(self, stream: DataStream, n: int) -> None:
        try:
            got = stream.read(n)
        except VfioError as exc:
            assert exc.errno in (errno.ENODEV, errno.ENOMSG, errno.EBADF, errno.EINVAL)
            return
        assert len(got) <= n
        if stream.disabled:
            assert got == b""

    @rule(stream=streams, data=st.binary(max_size=300))
    def write(self, stream: DataStream, data: bytes) -> None:
        before = self.dev.state_digest()
        try:
            stream.write(data)
        except VfioError as exc:
            assert exc.errno in (errno.ENODEV, errno.EBADF, errno.EINVAL, errno.ENOMEM,
                                 errno.EFAULT, errno.EOPNOTSUPP)  # fmt: skip
        assert self.dev.state_digest() == before  # writes never touch the live device

    @rule(stream=streams)
    def close(self, stream: DataStream) -> None:
        if stream.user_closed:
            try:
                stream.close()
            except VfioError as exc:
                assert exc.errno == errno.EBADF
            return
        stream.close()

    @rule(stream=streams)
    def precopy_info(self, stream: DataStream) -> None:
        try:
            info = stream.precopy_info()
        except VfioError as exc:
            assert exc.errno in (errno.EINVAL, errno.ENODEV, errno.ENOTTY)
            return
        assert self.dev.state in (S.PRE_COPY, S.PRE_COPY_P2P)
        assert info.initial_bytes >= 0 and info.dirty_bytes >= 0

    @rule(ticks=st.integers(0, 20))
    def run(self, ticks: int) -> None:
        before = self.dev.state_digest()
        moved = self.dev.run(ticks)
        if self.dev.state not in (S.RUNNING, S.PRE_COPY):
            assert moved == 0 and self.dev.state_digest() == before

    @rule()
    def reset(self) -> None:
        self.dev.reset()
        assert self.dev.state == S.RUNNING
        assert all(s.disabled for s in self.all)

    @invariant()
    def model_invariants(self) -> None:
        if not hasattr(self, "dev"):
            return
        self.dev.check_invariants()
        state = self.dev.state
        assert state == S.ERROR or supported(state, int(self.dev.migration_flags))
        live = [s for s in self.all if not s.disabled]
        assert len(live) <= 1
        for s in self.all:
            assert s.refcount >= 0
            assert (s.owner is None) == s.disabled
            if s.disabled and s.user_closed:
                assert s.refcount == 0


VfioDeviceMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
TestVfioDevice = VfioDeviceMachine.TestCase


# The zoo: each faulty mode must be caught by the same rules and invariants.
@pytest.mark.parametrize("fault", ["stale_fd", "commit_before_step"])
def test_faulty_models_are_caught(fault: str) -> None:
    machine = type(f"Faulty_{fault}", (VfioDeviceMachine,), {"faults": (fault,)})
    with pytest.raises(Exception):  # noqa: B017 - any failed rule or invariant counts
        run_state_machine_as_test(machine, settings=settings(
            max_examples=200, stateful_step_count=30, deadline=None, database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck)))  # fmt: skip
