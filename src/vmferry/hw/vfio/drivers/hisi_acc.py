"""hisi_acc-like driver: STOP_COPY | PRE_COPY without P2P; one fixed 176-byte struct.

Like ``drivers/vfio/pci/hisilicon``: the whole migration state is ``struct acc_vf_data``.
RUNNING -> PRE_COPY opens a file exposing only the first ``QM_MATCH_SIZE`` (40) bytes so
the destination can check compatibility early (precopy info: ``initial_bytes = 40 - pos``,
``dirty_bytes = 0``); PRE_COPY -> STOP_COPY stops the device and fills the full struct into
the same file, read on from the current offset.  On resume a write beyond the struct is
ENOMEM and, once 40 bytes arrived, a match header that differs from the local device is
EFAULT.  RESUMING -> STOP loads the registers.

The queues themselves live in guest RAM (event queue at ``eqe_dma``): each tick the device
writes an event-queue entry there by DMA and advances the queue registers.  The model
keeps its tick seed in ``qm_rsv_regs[0..1]`` and a checksum of the struct in ``padding``
(the hardware has none; the model's correct mode must reject corrupted streams).

The struct is the kernel's and keeps the kernel's layout: it has no header, and its
versions are told apart the way the kernel driver does, by ``acc_magic``.  Both are
declared once, as :data:`ACC_VF_DATA` (little-endian, 176 bytes each):

* version 1, ``acc_magic`` ``0xCDCDCDCDFEEDAACC`` (``ACC_DEV_MAGIC_V1``): what every
  release wrote;
* version 2, ``acc_magic`` ``0xAACCFEEDDECADEDE`` (``ACC_DEV_MAGIC_V2``): the first word of
  ``qm_rsv_state`` becomes ``major_ver u16 | minor_ver u16`` (1.0), inside the 40-byte
  match header, so the destination checks the version with the match data.  A major
  version other than 1 is refused.

An unknown ``acc_magic`` is refused (EINVAL) as soon as the match header arrives, a
match field that differs from the local device is EFAULT; the device keeps its state.
The device's registers (:attr:`HisiAccDriver.regs`) are kept in place as a version-1
struct; a saving session writes the version the destination announced at pre-flight
(``write_version``), version 1 to a destination that announces nothing.
"""

from __future__ import annotations

import enum
import errno
from typing import Any, ClassVar

import xxhash

from vmferry.errors import StreamDecodeError, UnsupportedVersion
from vmferry.hw.memory import GuestMemory
from vmferry.hw.persist import Field, StructLayout, StructVersion
from vmferry.hw.vfio.drivers.base import DeviceCapability, DmaRegion, VariantDriver, tick_word
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.states import MigrationFlags
from vmferry.hw.vfio.stream import DataStream

ACC_DEV_MAGIC_V1 = 0xCDCDCDCDFEEDAACC
ACC_DEV_MAGIC_V2 = 0xAACCFEEDDECADEDE
#: ACC_DRV_MAJOR_VER / ACC_DRV_MINOR_VER written in a version-2 struct
DRV_MAJOR, DRV_MINOR = 1, 0
QM_MATCH_SIZE = 40


class QmState(enum.IntEnum):
    """``vf_qm_state`` (encoded by these values)."""

    NOT_READY = 0
    READY = 1


def _acc_vf_data(rsv_state: tuple[Field, ...]) -> tuple[Field, ...]:
    """The fields of ``struct acc_vf_data`` after ``acc_magic``."""
    return (Field("qp_num", "u32"), Field("dev_id", "u32"), Field("que_iso_cfg", "u32"),
            Field("qp_base", "u32"), Field("vf_qm_state", "u32", QmState), *rsv_state,
            # aeq/eq int masks, ifc int source/mask/set, page size
            Field("rw_regs", "u32", count=6),
            Field("qm_eqc_dw", "u32", count=7), Field("qm_aeqc_dw", "u32", count=7),
            Field("qm_rsv_regs", "u32", count=5), Field("padding", "u32"),
            Field("eqe_dma", "u64"), Field("aeqe_dma", "u64"), Field("sqc_dma", "u64"),
            Field("cqc_dma", "u64"))  # fmt: skip


ACC_VF_DATA = StructLayout("hisi_acc acc_vf_data", Field("acc_magic", "u64"), (
    StructVersion(1, ACC_DEV_MAGIC_V1, _acc_vf_data((Field("qm_rsv_state", "u32", count=3),))),
    StructVersion(2, ACC_DEV_MAGIC_V2, _acc_vf_data((
        Field("major_ver", "u16"), Field("minor_ver", "u16"),
        Field("qm_rsv_state", "u32", count=2)))),
))  # fmt: skip
ACC_VF_DATA_SIZE = 176
assert all(ACC_VF_DATA.size(v.number) == ACC_VF_DATA_SIZE for v in ACC_VF_DATA.versions)
#: the match header's fields the destination compares with its own device
MATCH_FIELDS = ("qp_num", "dev_id", "que_iso_cfg", "qp_base")
SEC_VF_DEV_ID = 0xA256


class HisiAccDriver(VariantDriver):
    name: ClassVar[str] = "hisi_acc"
    STATE_VERSION: ClassVar[int] = ACC_VF_DATA.newest
    DMA_SLOT: ClassVar[int] = 16  # one event-queue entry

    def __init__(self, memory: GuestMemory, dma: DmaRegion, seed: int, qp_num: int = 2) -> None:
        self.flags = MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY
        self.qp_num = qp_num
        super().__init__(memory, dma, seed)
        self.regs = bytearray(ACC_VF_DATA_SIZE)
        self.hw_reset()

    # --- registers ----------------------------------------------------------------------------

    def get(self, name: str) -> tuple[int, ...]:
        offset, one = ACC_VF_DATA.field_at(1, name)
        return one.unpack_from(self.regs, offset)

    def put(self, name: str, *values: int) -> None:
        offset, one = ACC_VF_DATA.field_at(1, name)
        one.pack_into(self.regs, offset, *values)

    def hw_reset(self) -> None:
        self.regs[:] = bytes(ACC_VF_DATA_SIZE)
        q = self.dma.size // 4
        self.put("acc_magic", ACC_DEV_MAGIC_V1)
        self.put("qp_num", self.qp_num)
        self.put("dev_id", SEC_VF_DEV_ID)
        self.put("vf_qm_state", QmState.READY)
        self.put("rw_regs", 0, 0, 0, 0, 0, 0x1000)
        self.put("qm_rsv_regs", self.seed & 0xFFFFFFFF, self.seed >> 32 & 0xFFFFFFFF, 0, 0, 0)
        self.put("eqe_dma", self.dma.gpa)
        self.put("aeqe_dma", self.dma.gpa + q)
        self.put("sqc_dma", self.dma.gpa + 2 * q)
        self.put("cqc_dma", self.dma.gpa + 3 * q)

    def _advance(self) -> None:
        lo, hi, *_ = self.get("qm_rsv_regs")
        eqc = list(self.get("qm_eqc_dw"))
        aeqc = list(self.get("qm_aeqc_dw"))
        word = tick_word(lo | hi << 32, eqc[0])
        eqc[1 + word % 6] = (eqc[1 + word % 6] + (word >> 32)) & 0xFFFFFFFF
        if word % 4 == 0:
            aeqc[0] = (aeqc[0] + 1) & 0xFFFFFFFF
        regs = list(self.get("rw_regs"))
        regs[2] = word & 0xFFFFFFFF  # ifc_int_source
        self.put("rw_regs", *regs)
        slots = (self.dma.size // 4) // self.DMA_SLOT
        self.dma_write(eqc[0] % slots, eqc[0].to_bytes(8, "little") + word.to_bytes(8, "little"))
        eqc[0] = (eqc[0] + 1) & 0xFFFFFFFF
        self.put("qm_eqc_dw", *eqc)
        self.put("qm_aeqc_dw", *aeqc)

    def state_digest(self) -> str:
        return xxhash.xxh64_hexdigest(bytes(self.regs))

    def data_size(self) -> int:
        return ACC_VF_DATA_SIZE

    def capability(self) -> DeviceCapability:
        return DeviceCapability(self.name, self.flags, ACC_VF_DATA_SIZE,
                                (("qp_num", self.qp_num), ("dev_id", SEC_VF_DEV_ID)))  # fmt: skip

    # --- saving -------------------------------------------------------------------------------

    def snapshot(self, version: int | None = None) -> bytes:
        """The struct as saved (in ``version``, by default ``write_version``): the
        registers, with the model's checksum in ``padding``.  Cannot fail."""
        version = version or self.write_version
        values: dict[str, Any] = {}
        for f in ACC_VF_DATA.versions[0].fields:  # the registers, read as they are
            got = self.get(f.name)
            values[f.name] = got if f.count > 1 else got[0]
        values["padding"] = 0
        if version == 2:
            rsv = values["qm_rsv_state"]
            values.update(major_ver=DRV_MAJOR, minor_ver=DRV_MINOR, qm_rsv_state=rsv[1:])
        data = bytearray(ACC_VF_DATA.encode(values, version))
        offset, one = ACC_VF_DATA.field_at(1, "padding")
        one.pack_into(data, offset, xxhash.xxh32_intdigest(bytes(data)))
        return bytes(data)

    def _save_open(self, stream: DataStream, *, precopy: bool) -> None:
        data = self.snapshot()
        stream.append(data[:QM_MATCH_SIZE] if precopy else data)
        stream.initial_total = QM_MATCH_SIZE if precopy else 0

    def _save_final(self, stream: DataStream) -> None:
        stream.append(self.snapshot()[stream.appended :])
        stream.phase = "final"

    # --- resuming ------------------------------------------------------------------------------

    def _resume_open(self, stream: DataStream) -> None:
        stream.parser = bytearray()

    def _buffer(self, stream: DataStream) -> bytearray:
        buf = stream.parser
        if not isinstance(buf, bytearray):
            raise VfioError(errno.EBADF, f"{stream.name} is not a resuming stream")
        return buf

    def resume_write(self, stream: DataStream, data: memoryview) -> int:
        buf = self._buffer(stream)
        if len(buf) + len(data) > ACC_VF_DATA_SIZE:
            raise VfioError(errno.ENOMEM, f"resume data beyond {ACC_VF_DATA_SIZE} bytes")
        had = len(buf)
        buf += data
        if had < QM_MATCH_SIZE <= len(buf):
            self._match(bytes(buf[:QM_MATCH_SIZE]))
        return len(data)

    def _match(self, header: bytes) -> int:
        """Check the match header (the first 40 bytes) against this device; its version.
        EINVAL: a version this driver does not read; EFAULT: another device's state."""
        try:
            version = ACC_VF_DATA.version_of(header)
            if version == 2:
                offset, one = ACC_VF_DATA.field_at(2, "major_ver")
                (major,) = one.unpack_from(header, offset)
                if major != DRV_MAJOR:
                    raise UnsupportedVersion(f"hisi_acc acc_vf_data: migration driver "
                                             f"version {major}, this one is {DRV_MAJOR}",
                                             offset)  # fmt: skip
        except StreamDecodeError as exc:
            raise VfioError(errno.EINVAL, f"match header: {exc}") from exc
        for name in MATCH_FIELDS:
            offset, one = ACC_VF_DATA.field_at(version, name)
            if one.unpack_from(header, offset) != self.get(name):
                raise VfioError(errno.EFAULT, f"match header field {name} differs")
        return version

    def _resume_commit(self, stream: DataStream) -> None:
        buf = bytes(self._buffer(stream))
        if len(buf) != ACC_VF_DATA_SIZE:
            raise VfioError(errno.EINVAL, f"resume struct has {len(buf)} of "
                            f"{ACC_VF_DATA_SIZE} bytes")  # fmt: skip
        version = self._match(buf[:QM_MATCH_SIZE])
        try:
            values = ACC_VF_DATA.decode(buf)
        except StreamDecodeError as exc:
            raise VfioError(errno.EINVAL, f"resume struct: {exc}") from exc
        offset, one = ACC_VF_DATA.field_at(version, "padding")
        (check,) = one.unpack_from(buf, offset)
        if xxhash.xxh32_intdigest(buf[:offset] + bytes(4) + buf[offset + 4 :]) != check:
            raise VfioError(errno.EINVAL, "resume struct checksum mismatch")
        values["padding"] = 0
        if version == 2:  # the registers keep the version-1 struct
            values["qm_rsv_state"] = (0, *values["qm_rsv_state"])
        self.regs[:] = ACC_VF_DATA.encode(values, 1)

    def _resume_load_unchecked(self, stream: DataStream) -> None:
        buf = self._buffer(stream)
        self.regs[: len(buf)] = buf
