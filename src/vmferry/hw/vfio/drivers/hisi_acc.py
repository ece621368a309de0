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
"""

from __future__ import annotations

import errno
import struct
from typing import ClassVar

import xxhash

from vmferry.hw.memory import GuestMemory
from vmferry.hw.vfio.drivers.base import DeviceCapability, DmaRegion, VariantDriver, tick_word
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.states import MigrationFlags
from vmferry.hw.vfio.stream import DataStream

ACC_MAGIC = 0xCDCDCDCDFEEDAACC
QM_MATCH_SIZE = 40
#: struct acc_vf_data, as a layout table: field -> (offset, struct format)
LAYOUT: dict[str, tuple[int, str]] = {
    "acc_magic": (0, "<Q"),
    "qp_num": (8, "<I"),
    "dev_id": (12, "<I"),
    "que_iso_cfg": (16, "<I"),
    "qp_base": (20, "<I"),
    "vf_qm_state": (24, "<I"),
    "qm_rsv_state": (28, "<3I"),
    "rw_regs": (40, "<6I"),  # aeq/eq int masks, ifc int source/mask/set, page size
    "qm_eqc_dw": (64, "<7I"),
    "qm_aeqc_dw": (92, "<7I"),
    "qm_rsv_regs": (120, "<5I"),
    "padding": (140, "<I"),
    "eqe_dma": (144, "<Q"),
    "aeqe_dma": (152, "<Q"),
    "sqc_dma": (160, "<Q"),
    "cqc_dma": (168, "<Q"),
}
ACC_VF_DATA_SIZE = 176
MATCH_FIELDS = ("acc_magic", "qp_num", "dev_id", "que_iso_cfg", "qp_base")
SEC_VF_DEV_ID = 0xA256
QM_READY = 1


class HisiAccDriver(VariantDriver):
    name: ClassVar[str] = "hisi_acc"
    DMA_SLOT: ClassVar[int] = 16  # one event-queue entry

    def __init__(self, memory: GuestMemory, dma: DmaRegion, seed: int, qp_num: int = 2) -> None:
        self.flags = MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY
        self.qp_num = qp_num
        super().__init__(memory, dma, seed)
        self.regs = bytearray(ACC_VF_DATA_SIZE)
        self.hw_reset()

    # --- registers ----------------------------------------------------------------------------

    def get(self, name: str) -> tuple[int, ...]:
        offset, fmt = LAYOUT[name]
        return struct.unpack_from(fmt, self.regs, offset)

    def put(self, name: str, *values: int) -> None:
        offset, fmt = LAYOUT[name]
        struct.pack_into(fmt, self.regs, offset, *values)

    def hw_reset(self) -> None:
        self.regs[:] = bytes(ACC_VF_DATA_SIZE)
        q = self.dma.size // 4
        self.put("acc_magic", ACC_MAGIC)
        self.put("qp_num", self.qp_num)
        self.put("dev_id", SEC_VF_DEV_ID)
        self.put("vf_qm_state", QM_READY)
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
        self.dma_write(eqc[0] % slots, struct.pack("<QQ", eqc[0], word))
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

    def snapshot(self) -> bytes:
        """The struct as saved: registers with the model's checksum in ``padding``."""
        data = bytearray(self.regs)
        struct.pack_into("<I", data, LAYOUT["padding"][0], 0)
        struct.pack_into("<I", data, LAYOUT["padding"][0], xxhash.xxh32_intdigest(bytes(data)))
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

    def _match(self, header: bytes) -> None:
        for name in MATCH_FIELDS:
            offset, fmt = LAYOUT[name]
            if struct.unpack_from(fmt, header, offset) != self.get(name):
                raise VfioError(errno.EFAULT, f"match header field {name} differs")

    def _resume_commit(self, stream: DataStream) -> None:
        buf = bytes(self._buffer(stream))
        if len(buf) != ACC_VF_DATA_SIZE:
            raise VfioError(errno.EINVAL, f"resume struct has {len(buf)} of "
                            f"{ACC_VF_DATA_SIZE} bytes")  # fmt: skip
        self._match(buf[:QM_MATCH_SIZE])
        offset = LAYOUT["padding"][0]
        (check,) = struct.unpack_from("<I", buf, offset)
        zeroed = buf[:offset] + bytes(4) + buf[offset + 4 :]
        if xxhash.xxh32_intdigest(zeroed) != check:
            raise VfioError(errno.EINVAL, "resume struct checksum mismatch")
        self.regs[:] = zeroed

    def _resume_load_unchecked(self, stream: DataStream) -> None:
        buf = self._buffer(stream)
        self.regs[: len(buf)] = buf
