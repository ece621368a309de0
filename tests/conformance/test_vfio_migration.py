"""Conformance checks of docs/models/vfio-migration-v2.md §12, one test per check."""

from __future__ import annotations

import errno
import itertools
import random

import pytest

from vmferry.errors import Deadlock, NonTermination, RefcountLeak
from vmferry.hw.vfio import (
    DeviceState,
    MigrationFlags,
    VfioError,
    VfioMigrationDevice,
    next_state,
    path,
)
from vmferry.hw.vfio.fsm import states_for
from vmferry.hw.vfio.states import (
    FEATURE_HEADER,
    FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_STATE,
    FEATURE_MIGRATION,
    PRECOPY_INFO,
    VALID_FLAG_SETS,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_MIG_GET_PRECOPY_INFO,
    Feature,
)
from vmferry.hw.vfio.stream import FdTable
from vmferry.testing.vfio import (
    drain,
    expect_errno,
    feature_buf,
    make,
    raw_get,
    raw_set,
    resume,
    save_stop_copy,
    save_with_precopy,
)

S = DeviceState
GET, SET, PROBE = VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FEATURE_PROBE
F = VFIO_DEVICE_FEATURE

# --- feature multiplexer and structs --------------------------------------------------------


def test_check_1_struct_layouts() -> None:
    assert FEATURE_MIG_STATE.size == 8
    assert FEATURE_MIG_STATE.pack(3, -1) == b"\x03\x00\x00\x00\xff\xff\xff\xff"
    assert PRECOPY_INFO.size == 24
    packed = PRECOPY_INFO.pack(24, 0, 0x1122, 0x3344)
    assert packed[8:16] == (0x1122).to_bytes(8, "little")
    assert packed[16:24] == (0x3344).to_bytes(8, "little")
    assert FEATURE_HEADER.size == 8


def test_check_2_argsz_too_small() -> None:
    dev = make()
    buf = feature_buf(GET | Feature.MIG_DEVICE_STATE, bytes(8), argsz=7)
    before = bytes(buf)
    expect_errno(errno.EINVAL, dev.ioctl, F, buf)
    assert bytes(buf) == before


def test_check_3_get_set_without_probe_and_unknown_bit() -> None:
    dev = make()
    expect_errno(errno.EINVAL, dev.ioctl, F, feature_buf(GET | SET | 2, bytes(8)))
    expect_errno(errno.EINVAL, dev.ioctl, F, feature_buf((1 << 19) | GET | 2, bytes(8)))
    assert dev.state == S.RUNNING


def test_check_4_probe_needs_no_payload() -> None:
    dev = make()
    buf = feature_buf(PROBE | GET | SET | 2)
    assert len(buf) == 8
    assert dev.ioctl(F, buf) == 0
    assert bytes(buf) == FEATURE_HEADER.pack(8, PROBE | GET | SET | 2)


def test_check_5_no_migration_ops_is_enotty() -> None:
    dev = VfioMigrationDevice(None, name="plain")
    expect_errno(errno.ENOTTY, dev.ioctl, F, feature_buf(PROBE | 2))
    expect_errno(errno.ENOTTY, dev.ioctl, F, feature_buf(GET | 1, bytes(8)))


def test_check_6_payload_size() -> None:
    dev = make()
    buf = feature_buf(GET | 2, bytes(7), argsz=15)
    expect_errno(errno.EINVAL, dev.ioctl, F, buf)
    buf = feature_buf(GET | 2, bytes(8))
    assert dev.ioctl(F, buf) == 0
    assert FEATURE_MIG_STATE.unpack_from(buf, 8) == (S.RUNNING, -1)


def test_check_7_set_on_get_only_features() -> None:
    dev = make()
    expect_errno(errno.EINVAL, dev.ioctl, F, feature_buf(SET | 1, bytes(8)))
    expect_errno(errno.EINVAL, dev.ioctl, F, feature_buf(SET | 9, bytes(8)))


@pytest.mark.parametrize(
    ("kind", "flags"), [("mlx5", 0x7), ("pds_p2p", 0x3), ("pds", 0x1), ("hisi_acc", 0x5)]
)
def test_check_8_migration_flags(kind: str, flags: int) -> None:
    buf = feature_buf(GET | 1, bytes(8))
    make(kind).ioctl(F, buf)
    assert FEATURE_MIGRATION.unpack_from(buf, 8) == (flags,)


def _data_size(dev: VfioMigrationDevice) -> int:
    buf = feature_buf(GET | 9, bytes(8))
    dev.ioctl(F, buf)
    return int(FEATURE_MIG_DATA_SIZE.unpack_from(buf, 8)[0])


@pytest.mark.parametrize(("kind", "size"), [("pds", 65536), ("hisi_acc", 176), ("mlx5", None)])
def test_check_9_data_size_in_every_state(kind: str, size: int | None) -> None:
    dev = make(kind)
    expected = size if size is not None else dev.data_size()
    targets = [S.RUNNING, S.STOP_COPY, S.STOP, S.RESUMING]
    if dev.migration_flags & MigrationFlags.PRE_COPY:
        targets = [S.RUNNING, S.PRE_COPY, S.STOP_COPY, S.STOP, S.RESUMING]
    for target in targets:
        dev.set_state(target)
        # mlx5-like in PRE_COPY: STOP_COPY will produce only the FINAL delta, empty
        # while nothing is dirty (a 16-byte record header and a 40-byte image header)
        want = 16 + 40 if kind == "mlx5" and target == S.PRE_COPY else expected
        assert _data_size(dev) == want, target
    dev.reset()  # an empty RESUMING session can only be aborted by a reset


def test_check_10_unknown_feature_index() -> None:
    """vfio_pci_core_ioctl_feature's default case: -ENOTTY (issue 16)."""
    dev = make()
    expect_errno(errno.ENOTTY, dev.ioctl, F, feature_buf(GET | 0x7FF, bytes(8)))
    assert dev.state == S.RUNNING


# --- FSM algorithm ------------------------------------------------------------------------


#: Check 11, written out independently of the model's table: the first hop for every
#: (current, requested) pair with flags 0x7 (STOP_COPY | P2P | PRE_COPY), as
#: vfio_mig_get_next_state (drivers/vfio/vfio_main.c) computes it.  Every hop is one of the
#: arcs the uAPI header (include/uapi/linux/vfio.h) lists; "EINVAL" is the forbidden
#: STOP_COPY -> PRE_COPY / PRE_COPY_P2P ("These arcs are not permitted").
COLUMNS_11 = ["STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P", "PRE_COPY",
              "PRE_COPY_P2P"]
NEXT_HOP_11 = {
    "STOP":         ["STOP", "RUNNING_P2P", "STOP_COPY", "RESUMING", "RUNNING_P2P",
                     "RUNNING_P2P", "RUNNING_P2P"],
    "RUNNING":      ["RUNNING_P2P", "RUNNING", "RUNNING_P2P", "RUNNING_P2P", "RUNNING_P2P",
                     "PRE_COPY", "RUNNING_P2P"],
    "STOP_COPY":    ["STOP", "STOP", "STOP_COPY", "STOP", "STOP", "EINVAL", "EINVAL"],
    "RESUMING":     ["STOP", "STOP", "STOP", "RESUMING", "STOP", "STOP", "STOP"],
    "RUNNING_P2P":  ["STOP", "RUNNING", "STOP", "STOP", "RUNNING_P2P", "RUNNING",
                     "PRE_COPY_P2P"],
    "PRE_COPY":     ["RUNNING", "RUNNING", "PRE_COPY_P2P", "RUNNING", "RUNNING", "PRE_COPY",
                     "PRE_COPY_P2P"],
    "PRE_COPY_P2P": ["RUNNING_P2P", "RUNNING_P2P", "STOP_COPY", "RUNNING_P2P",
                     "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P"],
}  # fmt: skip
#: The FSM arcs of the uAPI header's comment (flags 0x7), transcribed.
HEADER_ARCS_11 = {
    ("RUNNING_P2P", "STOP"), ("STOP_COPY", "STOP"), ("RESUMING", "STOP"),
    ("PRE_COPY", "RUNNING"), ("RUNNING_P2P", "RUNNING"), ("PRE_COPY_P2P", "RUNNING_P2P"),
    ("RUNNING", "RUNNING_P2P"), ("STOP", "RUNNING_P2P"), ("RUNNING", "PRE_COPY"),
    ("RUNNING_P2P", "PRE_COPY_P2P"), ("STOP", "STOP_COPY"), ("PRE_COPY", "PRE_COPY_P2P"),
    ("PRE_COPY_P2P", "PRE_COPY"), ("PRE_COPY_P2P", "STOP_COPY"), ("STOP", "RESUMING"),
}


def test_check_11_raw_table_for_all_flags() -> None:
    for cur, row in NEXT_HOP_11.items():
        for new, hop in zip(COLUMNS_11, row, strict=True):
            if hop == "EINVAL":
                expect_errno(errno.EINVAL, next_state, 0x7, S[cur], S[new])
                continue
            assert next_state(0x7, S[cur], S[new]) == S[hop], (cur, new)
            assert cur == new or (cur, hop) in HEADER_ARCS_11, (cur, new, hop)
    for state in S:  # ERROR is never a valid current or requested state
        expect_errno(errno.EINVAL, next_state, 0x7, S.ERROR, state)
        expect_errno(errno.EINVAL, next_state, 0x7, state, S.ERROR)


_N = {s.name: s for s in DeviceState if s != S.ERROR}

# Section 4.3, transcribed: rows "from", columns in the order of the header.
PATHS: dict[int, tuple[list[str], list[list[str]]]] = {
    0x1: (["RUNNING", "STOP", "STOP_COPY", "RESUMING"], [
        ["-", "STOP", "STOP>STOP_COPY", "STOP>RESUMING"],
        ["RUNNING", "-", "STOP_COPY", "RESUMING"],
        ["STOP>RUNNING", "STOP", "-", "STOP>RESUMING"],
        ["STOP>RUNNING", "STOP", "STOP>STOP_COPY", "-"],
    ]),
    0x3: (["RUNNING", "STOP", "STOP_COPY", "RESUMING", "RUNNING_P2P"], [
        ["-", "RUNNING_P2P>STOP", "RUNNING_P2P>STOP>STOP_COPY", "RUNNING_P2P>STOP>RESUMING",
         "RUNNING_P2P"],
        ["RUNNING_P2P>RUNNING", "-", "STOP_COPY", "RESUMING", "RUNNING_P2P"],
        ["STOP>RUNNING_P2P>RUNNING", "STOP", "-", "STOP>RESUMING", "STOP>RUNNING_P2P"],
        ["STOP>RUNNING_P2P>RUNNING", "STOP", "STOP>STOP_COPY", "-", "STOP>RUNNING_P2P"],
        ["RUNNING", "STOP", "STOP>STOP_COPY", "STOP>RESUMING", "-"],
    ]),
    0x5: (["RUNNING", "STOP", "STOP_COPY", "RESUMING", "PRE_COPY"], [
        ["-", "STOP", "STOP>STOP_COPY", "STOP>RESUMING", "PRE_COPY"],
        ["RUNNING", "-", "STOP_COPY", "RESUMING", "RUNNING>PRE_COPY"],
        ["STOP>RUNNING", "STOP", "-", "STOP>RESUMING", "EINVAL"],
        ["STOP>RUNNING", "STOP", "STOP>STOP_COPY", "-", "STOP>RUNNING>PRE_COPY"],
        ["RUNNING", "RUNNING>STOP", "STOP_COPY", "RUNNING>STOP>RESUMING", "-"],
    ]),
    0x7: (["RUNNING", "STOP", "STOP_COPY", "RESUMING", "RUNNING_P2P", "PRE_COPY",
           "PRE_COPY_P2P"], [
        ["-", "RUNNING_P2P>STOP", "RUNNING_P2P>STOP>STOP_COPY", "RUNNING_P2P>STOP>RESUMING",
         "RUNNING_P2P", "PRE_COPY", "RUNNING_P2P>PRE_COPY_P2P"],
        ["RUNNING_P2P>RUNNING", "-", "STOP_COPY", "RESUMING", "RUNNING_P2P",
         "RUNNING_P2P>RUNNING>PRE_COPY", "RUNNING_P2P>PRE_COPY_P2P"],
        ["STOP>RUNNING_P2P>RUNNING", "STOP", "-", "STOP>RESUMING", "STOP>RUNNING_P2P", "EINVAL",
         "EINVAL"],
        ["STOP>RUNNING_P2P>RUNNING", "STOP", "STOP>STOP_COPY", "-", "STOP>RUNNING_P2P",
         "STOP>RUNNING_P2P>RUNNING>PRE_COPY", "STOP>RUNNING_P2P>PRE_COPY_P2P"],
        ["RUNNING", "STOP", "STOP>STOP_COPY", "STOP>RESUMING", "-", "RUNNING>PRE_COPY",
         "PRE_COPY_P2P"],
        ["RUNNING", "RUNNING>RUNNING_P2P>STOP", "PRE_COPY_P2P>STOP_COPY",
         "RUNNING>RUNNING_P2P>STOP>RESUMING", "RUNNING>RUNNING_P2P", "-", "PRE_COPY_P2P"],
        ["RUNNING_P2P>RUNNING", "RUNNING_P2P>STOP", "STOP_COPY", "RUNNING_P2P>STOP>RESUMING",
         "RUNNING_P2P", "PRE_COPY", "-"],
    ]),
}  # fmt: skip


@pytest.mark.parametrize("flags", [int(f) for f in VALID_FLAG_SETS])
def test_check_12_paths_match_section_4_3(flags: int) -> None:
    names, rows = PATHS[flags]
    assert sorted(_N[n] for n in names) == states_for(flags)
    for src_name, row in zip(names, rows, strict=True):
        for dst_name, cell in zip(names, row, strict=True):
            cur, new = _N[src_name], _N[dst_name]
            if cell == "EINVAL":
                expect_errno(errno.EINVAL, path, flags, cur, new)
            else:
                want = [] if cell == "-" else [_N[h] for h in cell.split(">")]
                assert path(flags, cur, new) == want, (src_name, dst_name)


def test_check_13_running_to_stop_arc() -> None:
    assert path(0x1, S.RUNNING, S.STOP) == [S.STOP]
    for cur in states_for(0x3):
        for new in states_for(0x3):
            hops = [cur, *path(0x3, cur, new)]
            assert (S.RUNNING, S.STOP) not in itertools.pairwise(hops)
    dev = make("pds_p2p")
    dev.set_state(S.STOP)
    assert dev.driver is not None
    assert dev.driver.arcs_seen == [(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.STOP)]


def test_check_14_unsupported_targets() -> None:
    dev = make("pds")
    expect_errno(errno.EINVAL, dev.set_state, S.RUNNING_P2P)
    assert dev.get_state() == S.RUNNING
    dev = make("pds_p2p")
    expect_errno(errno.EINVAL, dev.set_state, S.PRE_COPY)
    assert dev.get_state() == S.RUNNING


def test_check_15_out_of_range_targets() -> None:
    dev = make()
    for target in (8, 0xFFFFFFFF):
        buf = feature_buf(SET | 2, target.to_bytes(4, "little") + bytes(4))
        expect_errno(errno.EINVAL, dev.ioctl, F, buf)
        assert raw_get(dev) == (S.RUNNING, -1)


def test_check_16_error_is_never_a_target() -> None:
    dev = make()
    assert dev.driver is not None
    for start in (S.RUNNING, S.PRE_COPY, S.STOP_COPY, S.STOP, S.RESUMING):
        dev.set_state(start)
        seen = len(dev.driver.arcs_seen)
        rc, echoed, fd = raw_set(dev, S.ERROR)
        assert (rc, echoed, fd) == (errno.EINVAL, S.ERROR, -1)
        assert len(dev.driver.arcs_seen) == seen and dev.get_state() == start


def test_check_17_stop_copy_to_pre_copy() -> None:
    dev = make()
    dev.set_state(S.STOP_COPY)
    for target in (S.PRE_COPY, S.PRE_COPY_P2P):
        expect_errno(errno.EINVAL, dev.set_state, target)
        assert dev.get_state() == S.STOP_COPY
    faulty = VfioMigrationDevice(make().driver, name="old", fsm_mode="error_sentinel_loop")
    faulty.set_state(S.STOP_COPY)
    with pytest.raises(NonTermination):
        faulty.set_state(S.PRE_COPY)
    assert faulty.state_mutex.locked  # the spinning thread still holds it
    with pytest.raises(Deadlock):
        faulty.get_state()


@pytest.mark.parametrize("mode", ["fixed", "error_sentinel_loop"])
def test_check_18_no_precopy_flags_rejects_in_both_modes(mode: str) -> None:
    dev = VfioMigrationDevice(make("pds").driver, fsm_mode=mode)  # type: ignore[arg-type]
    dev.set_state(S.STOP_COPY)
    expect_errno(errno.EINVAL, dev.set_state, S.PRE_COPY)
    assert dev.get_state() == S.STOP_COPY and not dev.state_mutex.locked


def test_check_19_error_state_until_reset() -> None:
    dev = make("mlx5")
    dev.fail_arcs[(S.RUNNING, S.RUNNING_P2P)] = (errno.EIO, True)
    expect_errno(errno.EIO, dev.set_state, S.STOP)
    assert dev.get_state() == S.ERROR
    del dev.fail_arcs[(S.RUNNING, S.RUNNING_P2P)]
    for target in (S.RUNNING, S.STOP, S.STOP_COPY):
        expect_errno(errno.EINVAL, dev.set_state, target)
        assert dev.get_state() == S.ERROR
    dev.reset()
    assert dev.get_state() == S.RUNNING
    pds = make("pds")
    pds.fail_hardware()
    expect_errno(errno.EIO, pds.set_state, S.STOP)
    assert pds.get_state() == S.ERROR
    pds.reset()
    assert pds.get_state() == S.RUNNING


def test_check_20_set_to_current_state_is_noop() -> None:
    dev = make()
    rc, _, fd = raw_set(dev, S.STOP_COPY)
    assert rc == 0 and fd >= 0
    files = len(dev.files)
    assert raw_set(dev, S.STOP_COPY) == (0, S.STOP_COPY, -1)
    assert len(dev.files) == files
    assert dev.fds.get(fd).read(16)


# --- sessions and fds ------------------------------------------------------------------------


def test_check_21_combination_returns_one_fd_from_last_hop() -> None:
    dev = make()
    assert dev.driver is not None
    rc, _, fd = raw_set(dev, S.STOP_COPY)
    assert rc == 0 and fd >= 0 and len(dev.files) == 1
    assert [b for _, b in dev.driver.arcs_seen] == [S.RUNNING_P2P, S.STOP, S.STOP_COPY]


def test_check_22_precopy_to_stop_copy_keeps_the_fd() -> None:
    dev = make()
    rc, _, fd = raw_set(dev, S.PRE_COPY)
    assert rc == 0 and fd >= 0
    stream = dev.fds.get(fd)
    drain(stream)
    dev.run(10)
    assert raw_set(dev, S.STOP_COPY) == (0, S.STOP_COPY, -1)
    assert len(drain(stream)) > 0
    assert stream.read(10) == b""


@pytest.mark.parametrize("kind", ["mlx5", "pds"])
def test_check_23_new_session_new_fd_old_one_orphaned(kind: str) -> None:
    dev = make(kind)
    _, _, first = raw_set(dev, S.STOP_COPY)
    raw_set(dev, S.STOP)
    _, _, second = raw_set(dev, S.STOP_COPY)
    assert first != second
    old = dev.fds.get(first)
    if kind == "pds":
        assert old.read(100) == b""
    else:
        expect_errno(errno.ENODEV, old.read, 100)
    assert old.owner is None
    dev.check_invariants()


def test_check_24_leaving_precopy_disables_the_fd() -> None:
    dev = make()
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    dev.set_state(S.RUNNING)
    buf = bytearray(PRECOPY_INFO.pack(24, 0, 0, 0))
    err = expect_errno(errno.ENODEV, stream.ioctl, VFIO_MIG_GET_PRECOPY_INFO, buf)
    assert err.errno in (errno.EINVAL, errno.ENODEV)


def test_check_25_closing_resume_fd_early_loses_nothing() -> None:
    src, dst = make(), make()
    data, digest = save_stop_copy(src)
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    stream.write_all(data)
    stream.close()
    dst.set_state(S.STOP)
    assert dst.state_digest() == digest


def test_check_26_close_device_disables_fds() -> None:
    dev = make()
    _, _, fd = raw_set(dev, S.STOP_COPY)
    stream = dev.fds.get(fd)
    dev.close_device()
    expect_errno(errno.ENODEV, stream.read, 10)
    assert stream.owner is None and stream.refcount == 1  # only the user's fd
    dev.open_device()
    dev.run(20)
    expect_errno(errno.ENODEV, stream.read, 10)
    leaky = make(faults=["fd_outlives_close"])
    _, _, fd = raw_set(leaky, S.STOP_COPY)
    leaky.close_device()
    assert leaky.fds.get(fd).read(10)  # the hazard: still live after close
    with pytest.raises(Exception, match="orphaned"):
        leaky.check_invariants()


def test_check_27_stream_file_rules() -> None:
    dev = make()
    saving = dev.set_state(S.STOP_COPY)
    assert saving is not None
    expect_errno(errno.ESPIPE, saving.pread, 4, 0)
    expect_errno(errno.ESPIPE, saving.pwrite, b"x", 0)
    expect_errno(errno.EBADF, saving.write, b"x")
    dev.set_state(S.RESUMING)
    resuming = dev.driver.resuming if dev.driver else None
    assert resuming is not None
    expect_errno(errno.EBADF, resuming.read, 4)


def test_check_28_copy_out_fault_after_session_opened() -> None:
    dev = make()
    dev.set_state(S.STOP)
    buf = bytes(feature_buf(SET | 2, FEATURE_MIG_STATE.pack(S.STOP_COPY, -1)))  # read-only
    expect_errno(errno.EFAULT, dev.ioctl, F, buf)
    assert dev.get_state() == S.STOP_COPY
    assert not dev.fds.reserved and not dev.fds.files
    (stream,) = dev.files
    assert stream.refcount == 1
    dev.set_state(S.STOP)
    assert stream.refcount == 0
    leaky = make(faults=["leak_on_copyout_fault"])
    leaky.set_state(S.STOP)
    expect_errno(errno.EFAULT, leaky.ioctl, F, buf)
    with pytest.raises(RefcountLeak):
        leaky.check_invariants()


def test_check_29_fd_table_full() -> None:
    fds = FdTable(limit=4)
    dev = make(fds=fds)
    dev.set_state(S.STOP)
    fds.reserve()  # the only free number left
    rc, _, _ = raw_set(dev, S.RESUMING)
    assert rc == errno.EMFILE
    assert dev.get_state() == S.RESUMING
    (stream,) = dev.files
    assert stream.refcount == 1
    dev.reset()
    assert dev.get_state() == S.RUNNING and stream.refcount == 0 and stream.disabled


def test_check_30_no_file_leaks() -> None:
    src, dst = make(), make()
    _, _, fd = raw_set(src, S.PRE_COPY)
    data = drain(src.fds.get(fd))
    raw_set(src, S.STOP_COPY)
    data += drain(src.fds.get(fd))
    raw_set(src, S.STOP)
    src.fds.close(fd)
    _, _, rfd = raw_set(dst, S.RESUMING)
    dst.fds.get(rfd).write_all(data)
    dst.fds.close(rfd)
    raw_set(dst, S.RUNNING)
    src.close_device()
    dst.close_device()
    assert src.leaked_files() == [] and dst.leaked_files() == []
    assert len(src.files) == 1 and len(dst.files) == 1


# --- stream semantics ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlx5", "pds", "hisi_acc"])
def test_check_31_segmentation_is_free(kind: str) -> None:
    src = make(kind)
    data, digest = save_stop_copy(src)
    rng = random.Random(5)
    one_byte = [data[i : i + 1] for i in range(len(data))] if len(data) <= 70_000 else []
    cuts = sorted(rng.sample(range(1, len(data)), 20))
    random_split = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    for chunks in (one_byte, random_split):
        if not chunks:
            continue
        dst = make(kind)
        resume(dst, chunks)
        assert dst.state_digest() == digest


def _corruptions(data: bytes) -> dict[str, bytes]:
    half = len(data) // 2
    return {"swap": data[half:] + data[:half], "truncate": data[:-1], "append": data + b"\0"}


@pytest.mark.parametrize("kind", ["mlx5", "pds", "hisi_acc"])
@pytest.mark.parametrize("damage", ["swap", "truncate", "append"])
def test_check_32_damaged_stream_rejected(kind: str, damage: str) -> None:
    src = make(kind)
    data, _ = save_stop_copy(src)
    bad = _corruptions(data)[damage]
    dst = make(kind)
    dst.run(3)
    before = dst.state_digest()
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    with pytest.raises(VfioError):
        stream.write_all(bad)
        dst.set_state(S.STOP)
    assert dst.state_digest() == before
    assert dst.get_state() in (S.RESUMING, S.ERROR)
    dst.reset()
    assert dst.get_state() == S.RUNNING


def test_check_33_hisi_match_header_mismatch() -> None:
    data, _ = save_stop_copy(make("hisi_acc"))
    dst = make("hisi_acc", qp_num=8)
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    stream.write_all(data[:39])
    expect_errno(errno.EFAULT, stream.write, data[39:41])


def test_check_34_mlx5_record_parser() -> None:
    from vmferry.hw.vfio.drivers.mlx5 import RECORD, TAG_OPTIONAL

    src = make()
    data, digest = save_stop_copy(src)
    dst = make()
    extra = RECORD.pack(5, TAG_OPTIONAL, 77) + b"12345"
    resume(dst, [extra, data])
    assert dst.state_digest() == digest
    dst = make()
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    expect_errno(errno.EOPNOTSUPP, stream.write, RECORD.pack(5, 0, 77))
    expect_errno(errno.ENODEV, stream.write, b"x")
    dst = make()
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    expect_errno(errno.ENOMEM, stream.write, RECORD.pack(1 << 40, 0, 0))


def test_check_35_pds_buffer_limits() -> None:
    src = make("pds")
    data, digest = save_stop_copy(src)
    assert len(data) == 65536
    dst = make("pds")
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    assert stream.write(data + b"!") == 65536  # short write up to the allocation
    expect_errno(errno.EINVAL, stream.write, b"!")
    dst.set_state(S.STOP)
    assert dst.state_digest() == digest
    again = make("pds")
    saving = again.set_state(S.STOP_COPY)
    assert saving is not None
    assert len(drain(saving)) == 65536 and saving.read(1) == b""


@pytest.mark.parametrize("kind", ["mlx5", "hisi_acc"])
def test_check_36_precopy_portion_is_required(kind: str) -> None:
    src = make(kind)
    pre, final, digest = save_with_precopy(src)
    dst = make(kind)
    resume(dst, [pre, final])
    assert dst.state_digest() == digest
    dst = make(kind)
    dst.run(2)
    before = dst.state_digest()
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    with pytest.raises(VfioError):
        stream.write_all(final)
        dst.set_state(S.STOP)
    assert dst.state_digest() == before


# --- pre-copy ---------------------------------------------------------------------------------


def test_check_37_initial_bytes() -> None:
    dev = make()
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    info = stream.precopy_info()
    assert info.initial_bytes > 0 and info.dirty_bytes == 0
    assert len(stream.read(info.initial_bytes)) == info.initial_bytes
    assert stream.precopy_info().initial_bytes == 0


def test_check_38_enomsg_only_in_precopy() -> None:
    dev = make()
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    drain(stream)
    expect_errno(errno.ENOMSG, stream.read, 100)
    dev.set_state(S.STOP_COPY)
    drain(stream)
    assert stream.read(100) == b""


def test_check_39_dirty_bytes_track_activity() -> None:
    dev = make()
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    drain(stream)
    assert stream.precopy_info().dirty_bytes == 0
    dev.run(30)
    dirty = stream.precopy_info().dirty_bytes
    assert dirty > 0
    stream.read(dirty)
    assert stream.precopy_info().dirty_bytes < dirty


def test_check_40_precopy_ioctl_errors() -> None:
    dev = make()
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    expect_errno(errno.EINVAL, stream.ioctl, VFIO_MIG_GET_PRECOPY_INFO,
                 bytearray(PRECOPY_INFO.pack(23, 0, 0, 0)))  # fmt: skip
    expect_errno(errno.ENOTTY, stream.ioctl, VFIO_MIG_GET_PRECOPY_INFO + 1,
                 bytearray(PRECOPY_INFO.pack(24, 0, 0, 0)))  # fmt: skip
    dev.set_state(S.STOP_COPY)
    expect_errno(errno.EINVAL, stream.ioctl, VFIO_MIG_GET_PRECOPY_INFO,
                 bytearray(PRECOPY_INFO.pack(24, 0, 0, 0)))  # fmt: skip


def _info_flags(stream: object) -> tuple[int, int, int]:
    buf = bytearray(PRECOPY_INFO.pack(24, 0xFFFFFFFF, 0, 0))
    stream.ioctl(VFIO_MIG_GET_PRECOPY_INFO, buf)  # type: ignore[attr-defined]
    _, flags, initial, dirty = PRECOPY_INFO.unpack(buf)
    return flags, initial, dirty


def test_check_41_precopy_flags_not_echoed_and_reinit() -> None:
    from vmferry.hw.vfio.drivers.mlx5 import Mlx5Driver

    dev = make()
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    assert _info_flags(stream)[0] == 0
    echo = make(faults=["echo_precopy_flags"])
    estream = echo.set_state(S.PRE_COPY)
    assert _info_flags(estream)[0] == 0xFFFFFFFF
    assert dev.ioctl(F, feature_buf(SET | Feature.MIG_PRECOPY_INFOV2)) == 0
    drain(stream)
    assert isinstance(dev.driver, Mlx5Driver)
    dev.driver.trigger_reinit()
    flags, initial, dirty = _info_flags(stream)
    assert flags & 1 and initial > 0 and dirty == 0
    assert _info_flags(stream)[0] == 0


def test_check_42_hisi_precopy() -> None:
    dev = make("hisi_acc")
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    info = stream.precopy_info()
    assert (info.initial_bytes, info.dirty_bytes) == (40, 0)
    assert len(stream.read(100)) == 40
    dev.set_state(S.STOP_COPY)
    assert len(drain(stream)) == 136
    assert stream.read(1) == b""


# --- errors and reset ------------------------------------------------------------------------


def test_check_43_failing_hop_leaves_last_good_state() -> None:
    dev = make()
    dev.fail_arcs[(S.RUNNING_P2P, S.STOP)] = (errno.EIO, False)
    rc, echoed, fd = raw_set(dev, S.STOP_COPY)
    assert (rc, echoed, fd) == (errno.EIO, S.STOP_COPY, -1)
    assert raw_get(dev) == (S.RUNNING_P2P, -1)
    faulty = make(faults=["commit_before_step"])
    faulty.fail_arcs[(S.RUNNING_P2P, S.STOP)] = (errno.EIO, False)
    raw_set(faulty, S.STOP_COPY)
    assert raw_get(faulty)[0] == S.STOP  # claims a state the hardware never reached


def test_check_44_reset_from_precopy() -> None:
    dev = make()
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    dev.reset()
    assert dev.get_state() == S.RUNNING and stream.disabled
    expect_errno(errno.ENODEV, stream.read, 10)
    fresh = dev.set_state(S.STOP_COPY)
    assert fresh is not None and fresh is not stream and drain(fresh)


def test_check_45_vmm_detects_out_of_sync_fd() -> None:
    from vmferry.hw.vfio.vmm import VmmDevice

    dev = make()
    vmm = VmmDevice(dev)
    vmm.save_setup()
    assert vmm.data_fd >= 0
    dev.reset()  # asynchronous: the VMM's cached state is stale
    files = len(dev.fds.files)
    expect_errno(errno.EBADF, vmm.set_state, S.STOP_COPY)
    assert len(dev.fds.files) == files  # the new fd was closed again


# --- concurrency ---------------------------------------------------------------------------


def _two_sets(mode: tuple[str, ...]) -> list[BaseException | None]:
    from vmferry.testing.interleave import explore

    verdicts: list[BaseException | None] = []

    def build():  # type: ignore[no-untyped-def]
        dev = make(faults=list(mode))
        dev.set_state(S.STOP)

        def check(result):  # type: ignore[no-untyped-def]
            for err in result.errors.values():
                if err is not None and not isinstance(err, VfioError):
                    raise err
            dev.check_invariants()
            assert dev.state in (S.STOP_COPY, S.RESUMING)

        return {"a": lambda: dev.set_state(S.STOP_COPY),
                "b": lambda: dev.set_state(S.RESUMING)}, check  # fmt: skip

    for _, verdict in explore(build, max_schedules=3000):
        verdicts.append(verdict)
    return verdicts


def test_check_46_concurrent_sets_are_serialised() -> None:
    correct = _two_sets(())
    assert correct and all(v is None for v in correct)
    racy = _two_sets(("no_state_mutex",))
    assert any(v is not None for v in racy)


def _precopy_race(faults: list[str]) -> list[BaseException | None]:
    from vmferry.testing.interleave import explore

    out: list[BaseException | None] = []

    def build():  # type: ignore[no-untyped-def]
        dev = make(faults=faults)
        stream = dev.set_state(S.PRE_COPY)
        assert stream is not None
        got: list[object] = []

        def info() -> None:
            try:
                got.append(stream.precopy_info())
            except VfioError as exc:
                assert exc.errno == errno.EINVAL
                got.append(exc)

        def check(result):  # type: ignore[no-untyped-def]
            for err in result.errors.values():
                if err is not None:
                    raise err

        return {"info": info, "set": lambda: dev.set_state(S.STOP_COPY)}, check

    for _, verdict in explore(build):
        out.append(verdict)
    return out


def test_check_47_precopy_info_toctou() -> None:
    assert all(v is None for v in _precopy_race([]))
    assert any(v is not None for v in _precopy_race(["precopy_info_unlocked"]))


def _reset_race(faults: list[str]) -> list[tuple[object, BaseException | None]]:
    from vmferry.sync import ModelLock
    from vmferry.testing.interleave import explore

    out: list[tuple[object, BaseException | None]] = []

    def build():  # type: ignore[no-untyped-def]
        dev = make(faults=faults)
        memory_lock = ModelLock("memory_lock")
        driver = dev.driver
        assert driver is not None
        step = driver.step

        def pinning_step(*args):  # type: ignore[no-untyped-def]
            with memory_lock:  # a SAVE pins guest pages under state_mutex
                return step(*args)

        driver.step = pinning_step  # type: ignore[method-assign]

        def resetter() -> None:
            with memory_lock:  # vfio-pci resets under memory_lock
                dev.reset()

        def check(result):  # type: ignore[no-untyped-def]
            for err in result.errors.values():
                if err is not None:
                    raise err
            dev.check_invariants()
            assert dev.state in (S.RUNNING, S.STOP_COPY)  # reset before or after the SET
            if dev.state == S.RUNNING:
                assert all(f.disabled for f in dev.files)

        return {"set": lambda: dev.set_state(S.STOP_COPY), "reset": resetter}, check

    for result, verdict in explore(build):
        out.append((result, verdict))
    return out


def test_check_48_deferred_reset() -> None:
    correct = _reset_race([])
    assert correct and all(v is None for _, v in correct)
    faulty = _reset_race(["reset_takes_state_mutex"])
    assert any(isinstance(v, Deadlock) for _, v in faulty)


def test_check_49_get_sees_only_completed_hops() -> None:
    from vmferry.testing.interleave import explore

    def build():  # type: ignore[no-untyped-def]
        dev = make()
        seen: list[DeviceState] = []
        allowed = {S.RUNNING, *path(0x7, S.RUNNING, S.STOP_COPY)}

        def check(result):  # type: ignore[no-untyped-def]
            assert not result.failed, result.errors
            assert seen and set(seen) <= allowed

        return {"set": lambda: dev.set_state(S.STOP_COPY),
                "get": lambda: seen.append(dev.get_state())}, check  # fmt: skip

    verdicts = [v for _, v in explore(build)]
    assert len(verdicts) > 1 and all(v is None for v in verdicts)


# --- end to end (QEMU-like VMM) -----------------------------------------------------------------


def _kernel_hops(dev: VfioMigrationDevice, since: int) -> list[DeviceState]:
    assert dev.driver is not None
    return [b for _, b in dev.driver.arcs_seen[since:]]


def test_check_50_end_to_end_precopy_device() -> None:
    from vmferry.hw.vfio.vmm import VmmDevice, resume_all, switchover

    src_dev, dst_dev = make(), make()
    src, dst = VmmDevice(src_dev), VmmDevice(dst_dev)
    src_dev.run(20)
    src.save_setup()
    stream = bytearray()
    for _ in range(20):
        stream += src.save_iterate()
        src_dev.run(3)
    switchover([src])
    for chunk in src.complete_precopy():
        stream += chunk
    digest = src_dev.state_digest()
    src.save_cleanup()
    assert src.requested == [S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY, S.STOP]
    dst.load_setup()
    assert _kernel_hops(dst_dev, 0) == [S.RUNNING_P2P, S.STOP, S.RESUMING]
    dst.load_data(bytes(stream))
    mark = len(dst_dev.driver.arcs_seen) if dst_dev.driver else 0
    resume_all([dst])
    assert _kernel_hops(dst_dev, mark) == [S.STOP, S.RUNNING_P2P, S.RUNNING]
    assert dst.requested == [S.RESUMING, S.RUNNING_P2P, S.RUNNING]
    assert dst_dev.state_digest() == digest


def test_check_51_p2p_before_any_stop() -> None:
    from vmferry.errors import MigrationRefused
    from vmferry.hw.vfio.vmm import VmmDevice, check_migratable, switchover

    log: list[tuple[str, DeviceState]] = []
    devs = [make("mlx5"), make("pds_p2p")]
    for dev in devs:
        assert dev.driver is not None
        step = dev.driver.step

        def logged(owner, cur, nxt, effect, step=step, name=dev.name):  # type: ignore[no-untyped-def]
            log.append((name, nxt))
            return step(owner, cur, nxt, effect)

        dev.driver.step = logged  # type: ignore[method-assign]
    vmms = [VmmDevice(d) for d in devs]
    check_migratable(vmms)
    for vmm in vmms:
        vmm.save_setup()
    log.clear()
    switchover(vmms)
    first_stop = min(i for i, (_, s) in enumerate(log) if s in (S.STOP, S.STOP_COPY))
    quiesced = {n for n, s in log[:first_stop] if s in (S.RUNNING_P2P, S.PRE_COPY_P2P)}
    assert quiesced == {d.name for d in devs}
    with pytest.raises(MigrationRefused):
        check_migratable([VmmDevice(make("mlx5")), VmmDevice(make("pds"))])


def test_check_52_stop_copy_only_device() -> None:
    from vmferry.hw.vfio.vmm import VmmDevice, switchover

    dev = make("pds")
    vmm = VmmDevice(dev)
    vmm.save_setup()
    assert vmm.save_iterate() == b"" and vmm.data_fd == -1
    switchover([vmm])
    data = b"".join(vmm.complete_precopy())
    vmm.save_cleanup()
    assert vmm.requested == [S.STOP, S.STOP_COPY, S.STOP]
    assert len(data) == dev.data_size()


def test_check_53_multifd_in_order_loader() -> None:
    from vmferry.hw.vfio.vmm import MultifdLoader

    src = make()
    data, digest = save_stop_copy(src)
    quarter = len(data) // 4 + 1
    parts = [data[i * quarter : (i + 1) * quarter] for i in range(4)]
    dst = make()
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    loader = MultifdLoader(stream)
    for idx in (2, 0, 3, 1):
        loader.packet(idx, parts[idx])
    loader.packet(4, b"config", config=True)
    assert loader.written_order == [0, 1, 2, 3, 4] and loader.complete
    dst.set_state(S.STOP)
    assert dst.state_digest() == digest
    other = MultifdLoader(make().set_state(S.RESUMING))  # type: ignore[arg-type]
    other.packet(1, b"x")
    expect_errno(errno.EINVAL, other.packet, 1, b"x")
    expect_errno(errno.EINVAL, other.packet, 0xFFFFFFFF, b"x")


def test_check_54_failure_during_precopy() -> None:
    from vmferry.hw.vfio.vmm import VmmDevice

    dev = make()
    vmm = VmmDevice(dev)
    vmm.save_setup()
    vmm.save_iterate()
    first = dev.driver.saving if dev.driver else None
    vmm.migration_failed()
    assert dev.get_state() == S.RUNNING and first is not None and first.disabled
    dst = make()
    pre, final, digest = save_with_precopy(dev)
    resume(dst, [pre, final])
    assert dst.state_digest() == digest
