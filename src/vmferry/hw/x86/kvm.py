"""A thin, typed wrapper over the Linux KVM API for x86-64 (``/dev/kvm``).

This is the one part of :mod:`vmferry.hw` that does I/O: it opens ``/dev/kvm``, issues
ioctls and maps each vCPU's ``kvm_run`` page.  Everything goes through libc's ``ioctl``
via ctypes, which releases the GIL for the duration of the call -- so a thread blocked in
``KVM_RUN`` does not stop the rest of the process.  No threads are started here.

Ioctl numbers, capability numbers and struct layouts are those of
``include/uapi/linux/kvm.h`` for x86-64 (``docs/kvm-x86.md`` lists them).  State that
KVM hands out as a fixed-size struct (``kvm_regs``, ``kvm_sregs``, ``kvm_fpu``, ...) is kept
as the raw little-endian bytes KVM uses; :mod:`vmferry.hw.x86.state` documents how it is
carried in a migration stream.

Every object here owns file descriptors; ``close()`` releases them and is idempotent.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmferry.errors import KernelError

DEVICE = "/dev/kvm"
KVMIO = 0xAE


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(3, nr, size)


# --- sizes of the structs KVM exchanges ----------------------------------------------------
REGS_SIZE = 144
SREGS_SIZE = 312
FPU_SIZE = 416
XSAVE_SIZE = 4096
XCRS_SIZE = 392
EVENTS_SIZE = 64
MP_STATE_SIZE = 4
CLOCK_SIZE = 48
CPUID_ENTRY_SIZE = 40
MSR_ENTRY_SIZE = 16

# --- system ioctls ---------------------------------------------------------------------------
GET_API_VERSION = _io(0x00)
CREATE_VM = _io(0x01)
GET_MSR_INDEX_LIST = _iowr(0x02, 4)
CHECK_EXTENSION = _io(0x03)
GET_VCPU_MMAP_SIZE = _io(0x04)
GET_SUPPORTED_CPUID = _iowr(0x05, 8)
# --- VM ioctls -------------------------------------------------------------------------------
CREATE_VCPU = _io(0x41)
GET_DIRTY_LOG = _iow(0x42, 16)
SET_USER_MEMORY_REGION = _iow(0x46, 32)
SET_TSS_ADDR = _io(0x47)
SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
SET_CLOCK = _iow(0x7B, CLOCK_SIZE)
GET_CLOCK = _ior(0x7C, CLOCK_SIZE)
ENABLE_CAP = _iow(0xA3, 104)
CLEAR_DIRTY_LOG = _iowr(0xC0, 24)
RESET_DIRTY_RINGS = _io(0xC7)
# --- vCPU ioctls -----------------------------------------------------------------------------
RUN = _io(0x80)
GET_REGS = _ior(0x81, REGS_SIZE)
SET_REGS = _iow(0x82, REGS_SIZE)
GET_SREGS = _ior(0x83, SREGS_SIZE)
SET_SREGS = _iow(0x84, SREGS_SIZE)
GET_MSRS = _iowr(0x88, 8)
SET_MSRS = _iow(0x89, 8)
GET_FPU = _ior(0x8C, FPU_SIZE)
SET_FPU = _iow(0x8D, FPU_SIZE)
SET_CPUID2 = _iow(0x90, 8)
GET_CPUID2 = _iowr(0x91, 8)
GET_MP_STATE = _ior(0x98, MP_STATE_SIZE)
SET_MP_STATE = _iow(0x99, MP_STATE_SIZE)
GET_VCPU_EVENTS = _ior(0x9F, EVENTS_SIZE)
SET_VCPU_EVENTS = _iow(0xA0, EVENTS_SIZE)
GET_TSC_KHZ = _io(0xA3)
GET_XSAVE = _ior(0xA4, XSAVE_SIZE)
SET_XSAVE = _iow(0xA5, XSAVE_SIZE)
GET_XCRS = _ior(0xA6, XCRS_SIZE)
SET_XCRS = _iow(0xA7, XCRS_SIZE)

# --- capabilities ----------------------------------------------------------------------------
CAP_USER_MEMORY = 3
CAP_SET_TSS_ADDR = 4
CAP_NR_VCPUS = 9
CAP_NR_MEMSLOTS = 10
CAP_SYNC_MMU = 16
CAP_SET_IDENTITY_MAP_ADDR = 37
CAP_ADJUST_CLOCK = 39
CAP_VCPU_EVENTS = 41
CAP_XSAVE = 55
CAP_XCRS = 56
CAP_MAX_VCPUS = 66
CAP_IMMEDIATE_EXIT = 136
CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
CAP_DIRTY_LOG_RING = 192
CAP_XSAVE2 = 208
CAP_DIRTY_LOG_RING_ACQ_REL = 223

#: capabilities a vmferry x86-64 VM needs, by name (pre-flight checks them on both sides)
CAPABILITIES: dict[str, int] = {
    "USER_MEMORY": CAP_USER_MEMORY,
    "SYNC_MMU": CAP_SYNC_MMU,
    "IMMEDIATE_EXIT": CAP_IMMEDIATE_EXIT,
    "ADJUST_CLOCK": CAP_ADJUST_CLOCK,
    "VCPU_EVENTS": CAP_VCPU_EVENTS,
    "XSAVE": CAP_XSAVE,
    "XCRS": CAP_XCRS,
    "NR_VCPUS": CAP_NR_VCPUS,
    "MANUAL_DIRTY_LOG_PROTECT2": CAP_MANUAL_DIRTY_LOG_PROTECT2,
    "XSAVE2": CAP_XSAVE2,
    "DIRTY_LOG_RING": CAP_DIRTY_LOG_RING,
    "DIRTY_LOG_RING_ACQ_REL": CAP_DIRTY_LOG_RING_ACQ_REL,
}
REQUIRED_CAPABILITIES = ("USER_MEMORY", "SYNC_MMU", "IMMEDIATE_EXIT", "ADJUST_CLOCK",
                         "VCPU_EVENTS", "XSAVE", "XCRS")

MEM_LOG_DIRTY_PAGES = 1
DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1
DIRTY_LOG_INITIALLY_SET = 2

# --- exit reasons ----------------------------------------------------------------------------
EXIT_IO = 2
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17
EXIT_DIRTY_RING_FULL = 31
#: not a KVM exit reason: KVM_RUN returned EINTR (a signal, or immediate_exit was set)
EXIT_EINTR = -1

EXIT_NAMES = {
    EXIT_IO: "IO", EXIT_HLT: "HLT", EXIT_MMIO: "MMIO", EXIT_SHUTDOWN: "SHUTDOWN",
    EXIT_FAIL_ENTRY: "FAIL_ENTRY", EXIT_INTR: "INTR", EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    EXIT_DIRTY_RING_FULL: "DIRTY_RING_FULL", EXIT_EINTR: "EINTR",
}

MSR_KVM_POLL_CONTROL = 0x4B564D06

# --- the dirty ring ------------------------------------------------------------------------
#: where a vCPU's ring is mapped in its fd (``KVM_DIRTY_LOG_PAGE_OFFSET`` pages)
DIRTY_LOG_PAGE_OFFSET = 64
DIRTY_GFN_DIRTY = 1
DIRTY_GFN_RESET = 2
#: one ``kvm_dirty_gfn``: u32 flags, u32 slot (address space << 16 | slot id), u64 offset
DIRTY_GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int
MADV_POPULATE_WRITE = 23  # Linux 5.14


def populate_write(addr: int, length: int) -> bool:
    """Fault ``[addr, addr + length)`` of this process's memory in, writable, without
    changing its contents (``madvise(MADV_POPULATE_WRITE)``; the GIL is released, so
    another thread keeps running).  False where the kernel cannot."""
    return int(_madvise(addr, length, MADV_POPULATE_WRITE)) == 0


class KvmError(KernelError):
    """A KVM ioctl failed (``errno`` as the kernel returned it) or KVM is not usable."""


def ioctl(fd: int, request: int, arg: int | None = 0, what: str = "") -> int:
    """libc ``ioctl(fd, request, arg)``; the GIL is released while it runs.  ``arg`` is an
    integer or an address.  Raises KvmError with the errno on failure."""
    ret = int(_ioctl(fd, request, arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(err, f"{what or hex(request)}: {os.strerror(err)}")
    return ret


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def _get(fd: int, request: int, size: int, what: str) -> bytes:
    buf = ctypes.create_string_buffer(size)
    ioctl(fd, request, _addr(buf), what)
    return buf.raw


def _set(fd: int, request: int, data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise KvmError(errno.EINVAL, f"{what}: {len(data)} bytes, KVM takes {size}")
    buf = ctypes.create_string_buffer(data, size)
    ioctl(fd, request, _addr(buf), what)


@dataclass(frozen=True)
class CpuidEntry:
    """One ``kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    _FMT = struct.Struct("<7I12x")

    def pack(self) -> bytes:
        return self._FMT.pack(self.function, self.index, self.flags, self.eax, self.ebx,
                              self.ecx, self.edx)

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> CpuidEntry:
        return cls(*cls._FMT.unpack_from(data, offset))

    def reg(self, name: str) -> int:
        return int(getattr(self, name))


def pack_cpuid(entries: list[CpuidEntry]) -> bytes:
    return struct.pack("<II", len(entries), 0) + b"".join(e.pack() for e in entries)


def unpack_cpuid(data: bytes | memoryview) -> list[CpuidEntry]:
    (n,) = struct.unpack_from("<I", data)
    return [CpuidEntry.unpack(data, 8 + i * CPUID_ENTRY_SIZE) for i in range(n)]


def kvm_usable(path: str = DEVICE) -> tuple[bool, str]:
    """Whether KVM can run a vmferry x86-64 guest here, and if not, why (one line)."""
    if os.uname().machine != "x86_64":
        return False, f"this host is {os.uname().machine}, not x86_64"
    if not os.path.exists(path):
        return False, f"{path} does not exist (no KVM in this kernel or container)"
    try:
        kvm = Kvm(path)
    except KvmError as exc:
        return False, f"cannot open {path}: {os.strerror(exc.errno)}"
    try:
        version = kvm.api_version()
        if version != 12:
            return False, f"KVM API version {version}, not 12"
        missing = [n for n in REQUIRED_CAPABILITIES if not kvm.check_extension(CAPABILITIES[n])]
        if missing:
            return False, f"KVM lacks capabilities {missing}"
        return True, f"KVM API {version} on {path}"
    finally:
        kvm.close()


class Kvm:
    """The system fd (``/dev/kvm``)."""

    def __init__(self, path: str = DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(exc.errno or errno.ENODEV, f"open {path}: {exc.strerror}") from exc

    def api_version(self) -> int:
        return ioctl(self.fd, GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def capabilities(self) -> dict[str, int]:
        return {name: self.check_extension(cap) for name, cap in CAPABILITIES.items()}

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs KVM saves and restores for a vCPU."""
        n = 64
        while True:
            buf = ctypes.create_string_buffer(4 + 4 * n)
            struct.pack_into("<I", buf, 0, n)
            try:
                ioctl(self.fd, GET_MSR_INDEX_LIST, _addr(buf), "KVM_GET_MSR_INDEX_LIST")
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 65536:
                    n = struct.unpack_from("<I", buf, 0)[0] or n * 2
                    continue
                raise
            count = struct.unpack_from("<I", buf, 0)[0]
            return list(struct.unpack_from(f"<{count}I", buf, 4))

    def supported_cpuid(self) -> list[CpuidEntry]:
        n = 128
        while True:
            buf = ctypes.create_string_buffer(8 + CPUID_ENTRY_SIZE * n)
            struct.pack_into("<I", buf, 0, n)
            try:
                ioctl(self.fd, GET_SUPPORTED_CPUID, _addr(buf), "KVM_GET_SUPPORTED_CPUID")
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return unpack_cpuid(buf.raw)

    def create_vm(self) -> KvmVm:
        fd = ioctl(self.fd, CREATE_VM, 0, "KVM_CREATE_VM")
        return KvmVm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVm:
    """A VM fd: memory slots, the dirty log, the KVM clock and vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.manual_protect = False
        #: bytes of each vCPU's dirty ring, 0 without the ring
        self.dirty_ring_bytes = 0

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def set_tss_addr(self, gpa: int) -> None:
        ioctl(self.fd, SET_TSS_ADDR, gpa, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, gpa: int) -> None:
        val = ctypes.c_uint64(gpa)
        ioctl(self.fd, SET_IDENTITY_MAP_ADDR, ctypes.addressof(val), "KVM_SET_IDENTITY_MAP_ADDR")

    def enable_cap(self, cap: int, *args: int) -> None:
        buf = ctypes.create_string_buffer(104)
        struct.pack_into("<II4Q", buf, 0, cap, 0, *([*list(args), 0, 0, 0, 0])[:4])
        ioctl(self.fd, ENABLE_CAP, _addr(buf), f"KVM_ENABLE_CAP({cap})")

    def enable_manual_protect(self) -> None:
        """``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: GET_DIRTY_LOG no longer re-protects;
        CLEAR_DIRTY_LOG does (before any memslot with dirty logging exists)."""
        self.enable_cap(CAP_MANUAL_DIRTY_LOG_PROTECT2, DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self.manual_protect = True

    def enable_dirty_ring(self, size: int) -> None:
        """``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` with ``size`` bytes a vCPU (a power of two,
        at most what the capability check returns): dirty pages go to per-vCPU rings
        instead of the bitmap.  Only before the first vCPU exists."""
        self.enable_cap(CAP_DIRTY_LOG_RING_ACQ_REL, size)
        self.dirty_ring_bytes = size

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: re-protect the pages of every harvested entry (flag
        RESET) of every vCPU's ring and free those entries; how many were reset."""
        return ioctl(self.fd, RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")

    def set_memory(self, slot: int, gpa: int, size: int, addr: int, flags: int = 0) -> None:
        buf = ctypes.create_string_buffer(32)
        struct.pack_into("<IIQQQ", buf, 0, slot, flags, gpa, size, addr)
        ioctl(self.fd, SET_USER_MEMORY_REGION, _addr(buf), "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, npages: int) -> npt.NDArray[np.uint64]:
        """The slot's dirty bitmap (one bit a page, LSB first, in u64 words).  Without
        manual protect this also clears the log and re-protects the pages."""
        bitmap = np.zeros((npages + 63) // 64, dtype=np.uint64)
        buf = ctypes.create_string_buffer(16)
        struct.pack_into("<IIQ", buf, 0, slot, 0, bitmap.ctypes.data)
        ioctl(self.fd, GET_DIRTY_LOG, _addr(buf), "KVM_GET_DIRTY_LOG")
        return bitmap

    def clear_dirty_log(self, slot: int, first: int, npages: int,
                        bitmap: npt.NDArray[np.uint64]) -> None:
        """Re-protect (and clear) the pages set in ``bitmap`` (manual protect)."""
        if first % 64 or bitmap.dtype != np.uint64 or bitmap.size * 64 < npages:
            raise KvmError(errno.EINVAL, "KVM_CLEAR_DIRTY_LOG: bad range or bitmap")
        bm = np.ascontiguousarray(bitmap)
        buf = ctypes.create_string_buffer(24)
        struct.pack_into("<IIQQ", buf, 0, slot, npages, first, bm.ctypes.data)
        ioctl(self.fd, CLEAR_DIRTY_LOG, _addr(buf), "KVM_CLEAR_DIRTY_LOG")

    def get_clock(self) -> bytes:
        return _get(self.fd, GET_CLOCK, CLOCK_SIZE, "KVM_GET_CLOCK")

    def set_clock(self, data: bytes) -> None:
        # only the clock value is restored: flags (and the realtime/TSC pair) are inputs
        # KVM checks against this host, which is a different one after a migration
        clock = struct.unpack_from("<Q", data)[0]
        _set(self.fd, SET_CLOCK, struct.pack("<Q40x", clock), CLOCK_SIZE, "KVM_SET_CLOCK")

    def create_vcpu(self, index: int) -> KvmVcpu:
        fd = ioctl(self.fd, CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            vcpu = KvmVcpu(fd, index, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        if self.dirty_ring_bytes:
            try:
                vcpu.dirty_ring = DirtyRing(fd, self.dirty_ring_bytes)
            except BaseException:
                vcpu.close()
                raise
        return vcpu

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirtyRing:
    """One vCPU's dirty ring, mapped from its fd at page :data:`DIRTY_LOG_PAGE_OFFSET`.

    KVM fills entries in order and publishes each by setting its ``flags`` to DIRTY last
    (a store-release); :meth:`harvest` reads the flags first, then the offsets of the
    entries found DIRTY (x86 keeps loads in order, so plain loads are acquire loads), and
    hands each entry back by setting ``flags`` to RESET; ``KVM_RESET_DIRTY_RINGS`` then
    re-protects those pages and frees the entries.  The caller serialises harvests."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        self.entries = np.frombuffer(self.map, dtype=DIRTY_GFN)
        self.n = len(self.entries)
        #: the next entry to look at (entries are used round the ring)
        self.fetch = 0
        self.harvested = 0

    def harvest(self) -> npt.NDArray[np.uint64]:
        """The page offsets of the entries KVM published since the last harvest (in the
        order KVM logged them), each marked RESET."""
        # the flags first (in chunks from the fetch index, growing while all are ready,
        # so a quiet ring costs one small read), then the offsets of the ready entries
        flags, count, chunk = self.entries["flags"], 0, 256
        while count < self.n:
            a = (self.fetch + count) % self.n
            b = min(a + chunk, self.n, a + self.n - count)
            ready = (np.array(flags[a:b]) & DIRTY_GFN_DIRTY) != 0
            if not ready.all():
                count += int(np.argmin(ready))
                break
            count += b - a
            chunk = min(chunk * 4, self.n)
        if count == 0:
            return np.zeros(0, dtype=np.uint64)
        first, end = self.fetch, self.fetch + count
        spans = [(first, min(end, self.n))] + ([(0, end - self.n)] if end > self.n else [])
        offsets = np.concatenate([self.entries["offset"][a:b] for a, b in spans])
        for a, b in spans:  # contiguous runs: slices, not gathers, over the shared pages
            self.entries["flags"][a:b] = DIRTY_GFN_RESET
        self.fetch = end % self.n
        self.harvested += count
        return offsets

    def close(self) -> None:
        del self.entries
        self.map.close()


@dataclass(frozen=True)
class MmioExit:
    phys_addr: int
    data: bytes
    is_write: bool


class KvmVcpu:
    """One vCPU fd and its shared ``kvm_run`` page."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        self.run_page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        #: the vCPU's dirty ring, if the VM has the ring enabled
        self.dirty_ring: DirtyRing | None = None

    # --- running ---------------------------------------------------------------------

    def run(self) -> int:
        """``KVM_RUN``: the exit reason, or EXIT_EINTR when a signal or ``immediate_exit``
        ended it.  Other failures raise KvmError."""
        ret = int(_ioctl(self.fd, RUN, 0))
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return EXIT_EINTR
            raise KvmError(err, f"KVM_RUN on vCPU {self.index}: {os.strerror(err)}")
        return int(struct.unpack_from("<I", self.run_page, 8)[0])

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_page[1])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_page[1] = 1 if value else 0

    def mmio(self) -> MmioExit:
        """The ``mmio`` member of the exit union (after EXIT_MMIO)."""
        addr, data, length, is_write = struct.unpack_from("<Q8sIB", self.run_page, 32)
        return MmioExit(addr, data[: min(length, 8)], bool(is_write))

    def set_mmio_data(self, data: bytes) -> None:
        """The value an MMIO read returns (written before the next KVM_RUN)."""
        self.run_page[40 : 40 + len(data)] = data

    def internal_error(self) -> tuple[int, list[int]]:
        sub, n = struct.unpack_from("<II", self.run_page, 32)
        return sub, list(struct.unpack_from(f"<{min(n, 16)}Q", self.run_page, 40))

    def complete_exit(self) -> None:
        """Re-enter once with ``immediate_exit`` set so KVM completes the last exit (after
        an MMIO read, RIP and RAX are final only then); call before saving state."""
        self.immediate_exit = True
        try:
            with contextlib.suppress(KvmError):
                self.run()
        finally:
            self.immediate_exit = False

    # --- state -----------------------------------------------------------------------

    def get_regs(self) -> bytes:
        return _get(self.fd, GET_REGS, REGS_SIZE, "KVM_GET_REGS")

    def set_regs(self, data: bytes) -> None:
        _set(self.fd, SET_REGS, data, REGS_SIZE, "KVM_SET_REGS")

    def get_sregs(self) -> bytes:
        return _get(self.fd, GET_SREGS, SREGS_SIZE, "KVM_GET_SREGS")

    def set_sregs(self, data: bytes) -> None:
        _set(self.fd, SET_SREGS, data, SREGS_SIZE, "KVM_SET_SREGS")

    def get_fpu(self) -> bytes:
        return _get(self.fd, GET_FPU, FPU_SIZE, "KVM_GET_FPU")

    def set_fpu(self, data: bytes) -> None:
        _set(self.fd, SET_FPU, data, FPU_SIZE, "KVM_SET_FPU")

    def get_xsave(self) -> bytes:
        return _get(self.fd, GET_XSAVE, XSAVE_SIZE, "KVM_GET_XSAVE")

    def set_xsave(self, data: bytes) -> None:
        _set(self.fd, SET_XSAVE, data, XSAVE_SIZE, "KVM_SET_XSAVE")

    def get_xcrs(self) -> bytes:
        return _get(self.fd, GET_XCRS, XCRS_SIZE, "KVM_GET_XCRS")

    def set_xcrs(self, data: bytes) -> None:
        _set(self.fd, SET_XCRS, data, XCRS_SIZE, "KVM_SET_XCRS")

    def get_events(self) -> bytes:
        return _get(self.fd, GET_VCPU_EVENTS, EVENTS_SIZE, "KVM_GET_VCPU_EVENTS")

    def set_events(self, data: bytes) -> None:
        _set(self.fd, SET_VCPU_EVENTS, data, EVENTS_SIZE, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> bytes:
        return _get(self.fd, GET_MP_STATE, MP_STATE_SIZE, "KVM_GET_MP_STATE")

    def set_mp_state(self, data: bytes) -> None:
        _set(self.fd, SET_MP_STATE, data, MP_STATE_SIZE, "KVM_SET_MP_STATE")

    def tsc_khz(self) -> int:
        return ioctl(self.fd, GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        data = pack_cpuid(entries)
        buf = ctypes.create_string_buffer(data, len(data))
        ioctl(self.fd, SET_CPUID2, _addr(buf), "KVM_SET_CPUID2")

    def get_cpuid(self) -> list[CpuidEntry]:
        n = 256
        buf = ctypes.create_string_buffer(8 + CPUID_ENTRY_SIZE * n)
        struct.pack_into("<I", buf, 0, n)
        ioctl(self.fd, GET_CPUID2, _addr(buf), "KVM_GET_CPUID2")
        return unpack_cpuid(buf.raw)

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """The MSRs KVM reads, in order; stops at the first it refuses (as KVM does)."""
        buf = ctypes.create_string_buffer(8 + MSR_ENTRY_SIZE * len(indices))
        struct.pack_into("<II", buf, 0, len(indices), 0)
        for i, index in enumerate(indices):
            struct.pack_into("<IIQ", buf, 8 + i * MSR_ENTRY_SIZE, index, 0, 0)
        n = ioctl(self.fd, GET_MSRS, _addr(buf), "KVM_GET_MSRS")
        return [
            (index, struct.unpack_from("<Q", buf, 8 + i * MSR_ENTRY_SIZE + 8)[0])
            for i, index in enumerate(indices[:n])
        ]

    def set_msrs(self, msrs: list[tuple[int, int]]) -> int:
        """``KVM_SET_MSRS``: how many of ``msrs`` KVM set (it stops at the first refused)."""
        buf = ctypes.create_string_buffer(8 + MSR_ENTRY_SIZE * len(msrs))
        struct.pack_into("<II", buf, 0, len(msrs), 0)
        for i, (index, value) in enumerate(msrs):
            struct.pack_into("<IIQ", buf, 8 + i * MSR_ENTRY_SIZE, index, 0, value)
        return ioctl(self.fd, SET_MSRS, _addr(buf), "KVM_SET_MSRS")

    def close(self) -> None:
        if self.fd >= 0:
            if self.dirty_ring is not None:
                with contextlib.suppress(BufferError):
                    self.dirty_ring.close()
                self.dirty_ring = None
            with contextlib.suppress(BufferError):
                self.run_page.close()
            os.close(self.fd)
            self.fd = -1
