"""``vfio-data-stream``: a data-fd read racing a migration state transition.

A VMM thread reads the saving stream while another thread moves the device out of the
session's state (STOP_COPY -> STOP -> STOP_COPY opens a new session; PRE_COPY -> RUNNING
abandons pre-copy).  The uAPI rule (seed thread, Jason Gunthorpe): the driver orphans the
old file under its own file lock, so a read either returns bytes of the old session or
reaches the orphaned file's ENODEV -- never live device state, never the new session's
bytes.  Modes:

* ``correct``: the model as shipped;
* ``stale_fd``: the driver forgets the old file without disabling it (it stays live);
* ``precopy_info_unlocked``: the precopy-info query checks the state without
  ``state_mutex`` (the TOCTOU of docs/models/vfio-migration-v2.md §11.3).
"""

from __future__ import annotations

import errno

from vmferry.analysis.explore.api import Case, Instance, Scenario
from vmferry.analysis.explore.fingerprint import fingerprint
from vmferry.errors import UseAfterFree
from vmferry.hw.vfio.device import VfioMigrationDevice
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.factory import create_device
from vmferry.hw.vfio.modes import device_options
from vmferry.hw.vfio.states import DeviceState
from vmferry.hw.vfio.stream import DataStream

S = DeviceState
MODES = ("correct", "stale_fd", "precopy_info_unlocked")
_SPEC: dict[str, object] = {"id": "nic0", "driver": "mlx5", "state_mib": 1 / 64,
                            "dma_region": [0, 0x1000], "seed": 9}  # fmt: skip


class _Ram:
    """Guest RAM for the scenario's device DMA (a GuestMemory)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.data[gpa : gpa + n])

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        self.data[gpa : gpa + len(data)] = data


def _goto(dev: VfioMigrationDevice, state: DeviceState) -> None:
    dev.set_state(state)


def _device(mode: str) -> VfioMigrationDevice:
    faults, _ = device_options(mode)
    dev = create_device({**_SPEC, "faults": sorted(faults)}, _Ram(1 << 16))
    dev.run(8)
    return dev


def _session_bytes(target: DeviceState) -> bytes:
    """What the first session yields, from an identical twin device."""
    twin = _device("correct")
    stream = twin.set_state(target)
    assert stream is not None
    out = bytearray()
    while True:
        try:
            chunk = stream.read(1 << 16)
        except VfioError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def _read_once(stream: DataStream, got: list[bytes | int]) -> None:
    try:
        got.append(stream.read(256))
    except VfioError as exc:
        if exc.errno not in (errno.ENODEV, errno.ENOMSG):
            raise
        got.append(exc.errno)


def _check_reads(stream: DataStream, got: list[bytes | int], expected: bytes) -> None:
    data = b"".join(g for g in got if isinstance(g, bytes))
    if not expected.startswith(data):
        raise UseAfterFree(f"read returned bytes that are not the old session's: {data[:16]!r}")
    try:
        late = stream.read(256)
    except VfioError as exc:
        if exc.errno == errno.ENODEV:
            return
        raise
    raise UseAfterFree(f"orphaned {stream.name} still serves {len(late)} bytes")


def _build_restart(mode: str) -> Instance:
    dev = _device(mode)
    expected = _session_bytes(S.STOP_COPY)
    old = dev.set_state(S.STOP_COPY)
    assert old is not None
    got: list[bytes | int] = []

    def transition() -> None:
        dev.set_state(S.STOP)
        new = dev.set_state(S.STOP_COPY)
        assert new is not None and new is not old

    def check() -> None:
        dev.check_invariants()
        _check_reads(old, got, expected)

    return Instance({"reader": lambda: _read_once(old, got), "vmm": transition},
                    invariant=lambda: None, check=check,
                    state=lambda: fingerprint(dev, old, got))  # fmt: skip


def _build_abandon(mode: str) -> Instance:
    dev = _device(mode)
    expected = _session_bytes(S.PRE_COPY)
    old = dev.set_state(S.PRE_COPY)
    assert old is not None
    got: list[bytes | int] = []

    def check() -> None:
        dev.check_invariants()
        _check_reads(old, got, expected)

    return Instance({"reader": lambda: _read_once(old, got),
                     "vmm": lambda: _goto(dev, S.RUNNING)}, check=check,
                    state=lambda: fingerprint(dev, old, got))  # fmt: skip


def _build_precopy_info(mode: str) -> Instance:
    dev = _device(mode)
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None

    def query() -> None:
        try:
            stream.precopy_info()
        except VfioError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENODEV):
                raise

    return Instance({"info": query, "vmm": lambda: _goto(dev, S.RUNNING)},
                    check=dev.check_invariants,
                    state=lambda: fingerprint(dev, stream))  # fmt: skip


SCENARIO = Scenario(
    name="vfio-data-stream",
    description="a VFIO migration data-fd read or precopy query racing a state transition",
    modes=MODES,
    default_mode="correct",
    cases=(
        Case(
            "restart",
            "read the STOP_COPY fd while STOP_COPY -> STOP -> STOP_COPY",
            _build_restart,
            fails_in=frozenset({"stale_fd"}),
        ),
        Case(
            "abandon",
            "read the PRE_COPY fd while PRE_COPY -> RUNNING",
            _build_abandon,
            fails_in=frozenset({"stale_fd"}),
        ),
        Case(
            "precopy-info",
            "precopy info while PRE_COPY -> RUNNING",
            _build_precopy_info,
            fails_in=frozenset({"precopy_info_unlocked"}),
        ),
    ),
    mode_help={
        "correct": "orphaned files are disabled under their lock; info checks under the mutex",
        "stale_fd": "the driver forgets an ended session's file without disabling it "
                    "(deterministic: every schedule fails, not a race)",
        "precopy_info_unlocked": "precopy info checks the state without state_mutex",
    },
    preemption_bound=2,
    deterministic=frozenset({"stale_fd"}),
)
