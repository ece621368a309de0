"""Issue 14 item 5: the mlx5 and hisi_acc device images, versioned on the persist codec.

Both ways across releases: a source of this release writes version 1 for a destination
that announces nothing at pre-flight (the release before), byte for byte the committed
fixtures (tests/fixtures/vfio); a destination of this release loads those fixtures.  A
version-2 stream round-trips; an unknown or malformed version is refused with a typed
error (an errno, the decode error as its cause) and the destination device keeps its
state."""

from __future__ import annotations

import dataclasses
import errno
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import MalformedRecord, MigrationRefused, UnsupportedVersion
from vmferry.hw.vfio import DeviceState, VfioError, VfioMigrationDevice
from vmferry.hw.vfio.drivers import VariantDriver
from vmferry.hw.vfio.drivers.hisi_acc import (
    ACC_DEV_MAGIC_V1,
    ACC_DEV_MAGIC_V2,
    ACC_VF_DATA,
    QM_MATCH_SIZE,
    SEC_VF_DEV_ID,
    HisiAccDriver,
    QmState,
)
from vmferry.hw.vfio.drivers.mlx5 import IMAGE_HEADER, RECORD, ImageHead, ImageKind
from vmferry.machine.vfio import VfioHandler
from vmferry.testing.vfio import expect_errno, make, resume, save_stop_copy, save_with_precopy

S = DeviceState
FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "vfio"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
KINDS = ["mlx5", "hisi_acc"]
#: where the first FW_DATA image header sits in an mlx5 STOP_COPY stream from STOP
MLX5_IMAGE_AT = RECORD.size + 8 + RECORD.size


def fixture(kind: str) -> bytes:
    return (FIXTURES / f"{kind}-v1.bin").read_bytes()


def driver(dev: VfioMigrationDevice) -> VariantDriver:
    assert dev.driver is not None
    return dev.driver


def hisi(dev: VfioMigrationDevice) -> HisiAccDriver:
    drv = driver(dev)
    assert isinstance(drv, HisiAccDriver)
    return drv


def capabilities(kind: str) -> dict[str, Any]:
    """What a destination of this release announces at pre-flight for a ``kind`` device."""
    return VfioHandler([make(kind)]).capabilities()


# --- the declarations ------------------------------------------------------------------


def test_item5_mlx5_image_header_is_declared_in_both_versions() -> None:
    data = fixture("mlx5")
    raw = data[MLX5_IMAGE_AT : MLX5_IMAGE_AT + IMAGE_HEADER]
    head = ImageHead.decode(raw)
    assert head.kind is ImageKind.FULL and head.final and head.image_pages is None
    assert head.tick == EXPECTED["mlx5"]["ticks"] and head.npages == 0
    assert head.encode(1) == raw
    v2 = dataclasses.replace(head, image_pages=16)
    assert v2.encode(2)[:4] == b"MLI2" and len(v2.encode(2)) == IMAGE_HEADER
    assert ImageHead.decode(v2.encode(2)) == v2
    # the kind is encoded by its value: DELTA is 2 wherever it is declared
    delta = dataclasses.replace(v2, kind=ImageKind.DELTA).encode(2)
    assert struct.unpack_from("<H", delta, 4) == (2,)


def test_item5_hisi_struct_keeps_the_kernel_layout_in_both_versions() -> None:
    v1 = fixture("hisi_acc")
    values = ACC_VF_DATA.decode(v1)
    assert values["version"] == 1 and values["vf_qm_state"] is QmState.READY
    assert values["dev_id"] == SEC_VF_DEV_ID and len(values["qm_eqc_dw"]) == 7
    dev = make("hisi_acc")
    resume(dev, [v1])
    v2 = hisi(dev).snapshot(2)
    assert len(v2) == len(v1) == 176
    assert struct.unpack_from("<Q", v1) == (ACC_DEV_MAGIC_V1,)
    assert struct.unpack_from("<Q", v2) == (ACC_DEV_MAGIC_V2,)
    # major_ver 1, minor_ver 0 in the first word of qm_rsv_state, inside the match header
    assert struct.unpack_from("<HH", v2, 28) == (1, 0) and QM_MATCH_SIZE >= 32
    padding = ACC_VF_DATA.field_at(1, "padding")[0]
    assert v2[8:28] == v1[8:28] and v2[32:padding] == v1[32:padding]
    assert v2[padding + 4 :] == v1[padding + 4 :]
    decoded = ACC_VF_DATA.decode(v2)
    assert (decoded["version"], decoded["major_ver"], decoded["minor_ver"]) == (2, 1, 0)


# --- new source, old destination; old stream, new destination --------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_item5_source_writes_version_1_for_a_destination_of_the_earlier_release(
    kind: str,
) -> None:
    old = capabilities(kind)
    del old["state_versions"]  # the release before announces no state versions
    src = make(kind)
    assert VfioHandler([src]).preflight(old, {}) == []
    assert driver(src).write_version == 1
    data, digest = save_stop_copy(src, ticks=EXPECTED[kind]["ticks"])
    assert data == fixture(kind) and digest == EXPECTED[kind]["digest"]


@pytest.mark.parametrize("kind", KINDS)
def test_item5_source_writes_version_2_for_a_destination_that_announces_it(kind: str) -> None:
    new = capabilities(kind)
    assert new["state_versions"][kind] == 2
    src = make(kind)
    assert VfioHandler([src]).preflight(new, {}) == []
    assert driver(src).write_version == 2
    data, digest = save_stop_copy(src, ticks=EXPECTED[kind]["ticks"])
    assert data != fixture(kind) and digest == EXPECTED[kind]["digest"]
    dst = make(kind)
    resume(dst, [data])
    assert dst.state_digest() == digest


@pytest.mark.parametrize("kind", KINDS)
def test_item5_destination_of_this_release_loads_the_earlier_streams(kind: str) -> None:
    dst = make(kind)
    before = dst.state_digest()
    resume(dst, [fixture(kind)])
    assert dst.state_digest() == EXPECTED[kind]["digest"] != before


@pytest.mark.parametrize(("announced", "want"), [
    ({"mlx5": 1, "hisi_acc": 1}, 1),
    ({"pds": 1}, 1),  # announces versions, none for this driver: it reads version 1
    ({"mlx5": 9, "hisi_acc": 9}, 2),  # a later release: the newest both read
])  # fmt: skip
@pytest.mark.parametrize("kind", KINDS)
def test_item5_write_version_is_the_newest_both_sides_read(
    kind: str, announced: dict[str, int], want: int
) -> None:
    caps = {**capabilities(kind), "state_versions": announced}
    src = make(kind)
    VfioHandler([src]).preflight(caps, {})
    assert driver(src).write_version == want


@pytest.mark.parametrize("announced", [[2], {"mlx5": "2"}, {"mlx5": 0}, {"mlx5": True}])
def test_item5_malformed_version_announcement_is_a_refusal(announced: object) -> None:
    caps = {**capabilities("mlx5"), "state_versions": announced}
    with pytest.raises(MigrationRefused, match="state version"):
        VfioHandler([make("mlx5")]).preflight(caps, {})


def test_item5_snapshot_without_a_destination_writes_the_newest() -> None:
    src = make("hisi_acc")
    handler = VfioHandler([src])
    handler.preflight({**capabilities("hisi_acc"), "state_versions": {}}, {})
    assert driver(src).write_version == 1
    handler.save_cleanup()
    handler.preflight(None, {})
    assert driver(src).write_version == 2


def test_item5_hisi_version_2_through_pre_copy() -> None:
    src = make("hisi_acc")
    pre, final, digest = save_with_precopy(src)
    assert len(pre) == QM_MATCH_SIZE and struct.unpack_from("<Q", pre) == (ACC_DEV_MAGIC_V2,)
    dst = make("hisi_acc")
    resume(dst, [pre, final])
    assert dst.state_digest() == digest


# --- refusals: typed, and the destination keeps its state --------------------------------


def refused(kind: str, data: bytes, err: int, words: str, *, commit: bool = False) -> VfioError:
    """Resume ``data`` into a fresh device: the write (or, with ``commit``, the move to
    STOP) fails with ``err`` naming ``words``; the device's state is what it was."""
    dst = make(kind)
    before = dst.state_digest()
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    if commit:
        stream.write_all(data)
        exc = expect_errno(err, dst.set_state, S.STOP)
    else:
        exc = expect_errno(err, stream.write, data)
    assert words in str(exc), str(exc)
    assert dst.state_digest() == before
    return exc


def test_item5_mlx5_unknown_image_version_is_refused() -> None:
    data = bytearray(fixture("mlx5"))
    data[MLX5_IMAGE_AT : MLX5_IMAGE_AT + 4] = b"MLI9"
    exc = refused("mlx5", bytes(data), errno.EINVAL, "names no version this build reads")
    assert isinstance(exc.__cause__, UnsupportedVersion)


def test_item5_mlx5_unknown_image_kind_is_refused() -> None:
    data = bytearray(fixture("mlx5"))
    struct.pack_into("<H", data, MLX5_IMAGE_AT + 4, 3)
    exc = refused("mlx5", bytes(data), errno.EINVAL, "kind 3 is not a ImageKind")
    assert isinstance(exc.__cause__, MalformedRecord)


def test_item5_mlx5_version_2_image_of_another_device_size_is_refused() -> None:
    data, _ = save_stop_copy(make("mlx5"))
    dst_pages = int(0.125 * (1 << 20)) // 4096
    dst = make("mlx5", state_mib=0.125)
    before = dst.state_digest()
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    exc = expect_errno(errno.EINVAL, stream.write, data)
    assert f"image of 16 pages, this device's is {dst_pages}" in str(exc)
    assert dst.state_digest() == before


def test_item5_hisi_unknown_magic_is_refused_at_the_match_header() -> None:
    data = bytearray(fixture("hisi_acc"))
    struct.pack_into("<Q", data, 0, 0x1234)
    exc = refused("hisi_acc", bytes(data[:QM_MATCH_SIZE]), errno.EINVAL, "acc_magic 0x1234")
    assert isinstance(exc.__cause__, UnsupportedVersion)


def test_item5_hisi_other_major_version_is_refused() -> None:
    data = bytearray(hisi(make("hisi_acc")).snapshot(2))
    struct.pack_into("<H", data, 28, 2)
    exc = refused("hisi_acc", bytes(data), errno.EINVAL, "migration driver version 2")
    assert isinstance(exc.__cause__, UnsupportedVersion)


@pytest.mark.parametrize("version", [1, 2])
def test_item5_hisi_malformed_queue_state_is_refused_on_load(version: int) -> None:
    data = bytearray(hisi(make("hisi_acc")).snapshot(version))
    struct.pack_into("<I", data, 24, 7)  # vf_qm_state
    exc = refused("hisi_acc", bytes(data), errno.EINVAL, "vf_qm_state 7 is not a QmState",
                  commit=True)  # fmt: skip
    assert isinstance(exc.__cause__, MalformedRecord)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 175), st.integers(1, 255), st.sampled_from([1, 2]))
def test_item5_hisi_any_corrupt_byte_is_refused(at: int, xor: int, version: int) -> None:
    """Flip bits in one byte of a saved struct: the destination refuses it with a
    VfioError (at the match header or on load) and keeps its state."""
    data = bytearray(hisi(make("hisi_acc")).snapshot(version))
    data[at] ^= xor
    dst = make("hisi_acc")
    before = dst.state_digest()
    stream = dst.set_state(S.RESUMING)
    assert stream is not None
    try:
        stream.write_all(bytes(data))
        dst.set_state(S.STOP)
    except VfioError:
        assert dst.state_digest() == before
    else:  # the checksum lives in padding: no other byte can change unnoticed
        raise AssertionError(f"corrupt byte {at} loaded")
