"""Issue 14 item 5: the VFIO driver images on the persist layout.

The pds blob header and the device image header are declared persist layouts (version 1,
the bytes every release wrote); a stream written by the release before the change still
loads (tests/fixtures/vfio), and what this release sends to a destination that reads
version 1 only is byte for byte what it sent, so a destination of the earlier release
reads it (the mlx5 and hisi_acc versions: test_driver_versions.py)."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import BadMagic, MalformedRecord, StreamDecodeError, UnsupportedVersion
from vmferry.hw.vfio import DeviceState, VfioMigrationDevice
from vmferry.hw.vfio.drivers import VariantDriver
from vmferry.hw.vfio.drivers.image import IMAGE_LAYOUT, NQUEUES, ImageHeader
from vmferry.hw.vfio.drivers.pds import BLOB_HEADER, BlobHeader
from vmferry.testing.vfio import expect_errno, make, resume, save_stop_copy

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "vfio"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
KINDS = ["pds", "mlx5", "hisi_acc"]


def driver(dev: VfioMigrationDevice) -> VariantDriver:
    assert dev.driver is not None
    return dev.driver


@pytest.mark.parametrize("kind", KINDS)
def test_item5_stream_of_the_release_still_loads(kind: str) -> None:
    data = (FIXTURES / f"{kind}-v1.bin").read_bytes()
    assert len(data) == EXPECTED[kind]["size"]
    dst = make(kind)
    resume(dst, [data])
    assert dst.state_digest() == EXPECTED[kind]["digest"]
    # what this release sends an earlier one for the same device is what that one sent
    driver(dst).write_version = 1
    again, _ = save_stop_copy(dst, ticks=0)
    assert again == data


@pytest.mark.parametrize("kind", KINDS)
def test_item5_release_stream_is_reproduced_from_the_same_run(kind: str) -> None:
    src = make(kind)
    driver(src).write_version = 1
    data, digest = save_stop_copy(src, ticks=EXPECTED[kind]["ticks"])
    assert digest == EXPECTED[kind]["digest"]
    assert data == (FIXTURES / f"{kind}-v1.bin").read_bytes()


def test_item5_pds_header_roundtrip_and_fields() -> None:
    data = (FIXTURES / "pds-v1.bin").read_bytes()
    head = BlobHeader.decode(data[: BLOB_HEADER.size])
    assert head.payload_len == len(data) - BLOB_HEADER.size
    assert head.tick == EXPECTED["pds"]["ticks"]
    assert head.encode() == data[: BLOB_HEADER.size]
    image = ImageHeader.decode(data[BLOB_HEADER.size :])
    assert image.tick == EXPECTED["pds"]["ticks"] and len(image.heads) == NQUEUES
    assert sum(image.heads) == image.tick and image.seed == 7
    assert image.encode() == data[BLOB_HEADER.size : BLOB_HEADER.size + IMAGE_LAYOUT.header_size]


def expect_restore_refused(blob: bytes, words: str) -> None:
    dst = make("pds")
    stream = dst.set_state(DeviceState.RESUMING)
    assert stream is not None
    stream.write_all(blob)
    exc = expect_errno(errno.EINVAL, dst.set_state, DeviceState.STOP)
    assert words in str(exc)


@pytest.mark.parametrize(("offset", "patch", "words"), [
    (0, b"PDSX", "magic"),
    (4, struct.pack("<H", 2), "version 2"),
    (8, struct.pack("<Q", 12), "payload of 12 bytes"),
    (16, struct.pack("<Q", 1), "checksum"),
])  # fmt: skip
def test_item5_pds_restore_names_what_is_wrong(offset: int, patch: bytes, words: str) -> None:
    blob = bytearray((FIXTURES / "pds-v1.bin").read_bytes())
    blob[offset : offset + len(patch)] = patch
    expect_restore_refused(bytes(blob), words)


def test_item5_pds_restore_refuses_a_foreign_image_header() -> None:
    import xxhash

    blob = bytearray((FIXTURES / "pds-v1.bin").read_bytes())
    at = BLOB_HEADER.size + 4
    blob[at : at + 2] = struct.pack("<H", 9)  # image version 9
    struct.pack_into("<Q", blob, 16, xxhash.xxh3_64_intdigest(bytes(blob[BLOB_HEADER.size :])))
    expect_restore_refused(bytes(blob), "device image state: version 9")


def test_item5_image_header_typed_errors() -> None:
    good = ImageHeader(5, 3, 2, 128, (1, 1, 1, 0)).encode()
    assert ImageHeader.decode(good) == ImageHeader(5, 3, 2, 128, (1, 1, 1, 0))
    with pytest.raises(BadMagic):
        ImageHeader.decode(b"XDEV" + good[4:])
    with pytest.raises(UnsupportedVersion):
        ImageHeader.decode(good[:4] + b"\x02\x00" + good[6:])
    with pytest.raises(MalformedRecord, match="3 queues"):
        ImageHeader.decode(good[:6] + b"\x03\x00" + good[8:])


@given(st.binary(max_size=80))
def test_item5_garbage_headers_are_typed_decode_errors(data: bytes) -> None:
    with pytest.raises(StreamDecodeError):
        BlobHeader.decode(data)
    if not data.startswith(b"VDEV\x01\x00\x04\x00") or len(data) < IMAGE_LAYOUT.header_size:
        with pytest.raises(StreamDecodeError):
            ImageHeader.decode(data)
