"""VFIO migration v2 uAPI: states, capability flags, ioctl numbers and struct layouts.

Every number here is the kernel's (``include/uapi/linux/vfio.h``).  Struct layouts are
declared once as :class:`struct.Struct` objects (little-endian, natural alignment), so the
packing, unpacking and size of each come from one declaration::

    vfio_device_feature            argsz u32 @0 | flags u32 @4 | data[] @8
    vfio_device_feature_migration  flags u64 @0                              (8 bytes)
    vfio_device_feature_mig_state  device_state u32 @0 | data_fd s32 @4      (8 bytes)
    vfio_device_feature_mig_data_size  stop_copy_length u64 @0               (8 bytes)
    vfio_precopy_info  argsz u32 @0 | flags u32 @4 | initial_bytes u64 @8 | dirty_bytes u64 @16
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag


class DeviceState(IntEnum):
    """``enum vfio_device_mig_state``."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


#: ``VFIO_DEVICE_STATE_NR``: values at or above it are invalid requests
DEVICE_STATE_NR = 8


class MigrationFlags(IntFlag):
    """``vfio_device_feature_migration.flags``."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


#: The four flag sets the uAPI defines (STOP_COPY is mandatory).
VALID_FLAG_SETS: tuple[MigrationFlags, ...] = (
    MigrationFlags.STOP_COPY,
    MigrationFlags.STOP_COPY | MigrationFlags.P2P,
    MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY,
    MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY,
)

#: Per-state flag requirement of ``vfio_mig_get_next_state``; ERROR can never be met.
STATE_REQUIRES: dict[DeviceState, int] = {
    DeviceState.STOP: 0x1,
    DeviceState.RUNNING: 0x1,
    DeviceState.STOP_COPY: 0x1,
    DeviceState.RESUMING: 0x1,
    DeviceState.RUNNING_P2P: 0x3,
    DeviceState.PRE_COPY: 0x5,
    DeviceState.PRE_COPY_P2P: 0x7,
    DeviceState.ERROR: 0xFFFFFFFF,
}

#: States of the saving group: a session streams device state out while in them.
SAVING_STATES = frozenset({DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P, DeviceState.STOP_COPY})
PRE_COPY_STATES = frozenset({DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P})


def supported(state: int, flags: int) -> bool:
    """Whether a device with ``flags`` supports ``state`` (False for values >= 8)."""
    if not 0 <= state < DEVICE_STATE_NR:
        return False
    need = STATE_REQUIRES[DeviceState(state)]
    return (need & flags) == need


# --- ioctls -------------------------------------------------------------------------------

VFIO_TYPE = 0x3B  # ';'
VFIO_BASE = 100
VFIO_DEVICE_RESET = (VFIO_TYPE << 8) | (VFIO_BASE + 11)  # 0x3B6F, device fd
VFIO_DEVICE_FEATURE = (VFIO_TYPE << 8) | (VFIO_BASE + 17)  # 0x3B75, device fd
VFIO_MIG_GET_PRECOPY_INFO = (VFIO_TYPE << 8) | (VFIO_BASE + 21)  # 0x3B79, data fd

VFIO_DEVICE_FEATURE_MASK = 0x0000FFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
FEATURE_FLAG_BITS = (
    VFIO_DEVICE_FEATURE_MASK
    | VFIO_DEVICE_FEATURE_GET
    | VFIO_DEVICE_FEATURE_SET
    | VFIO_DEVICE_FEATURE_PROBE
)


class Feature(IntEnum):
    """``VFIO_DEVICE_FEATURE_*`` indices (the low 16 bits of the feature flags)."""

    PCI_VF_TOKEN = 0
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    LOW_POWER_ENTRY = 3
    LOW_POWER_ENTRY_WITH_WAKEUP = 4
    LOW_POWER_EXIT = 5
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9
    BUS_MASTER = 10
    DMA_BUF = 11
    MIG_PRECOPY_INFOV2 = 12


#: ``VFIO_PRECOPY_INFO_REINIT``: output flag of the precopy info (after the v2 opt-in)
VFIO_PRECOPY_INFO_REINIT = 1 << 0

# --- struct layouts -----------------------------------------------------------------------

FEATURE_HEADER = struct.Struct("<II")  # argsz, flags
FEATURE_MIGRATION = struct.Struct("<Q")  # flags
FEATURE_MIG_STATE = struct.Struct("<Ii")  # device_state, data_fd
FEATURE_MIG_DATA_SIZE = struct.Struct("<Q")  # stop_copy_length
PRECOPY_INFO = struct.Struct("<IIQQ")  # argsz, flags, initial_bytes, dirty_bytes

#: minimum payload size of features 1, 2 and 9
MIG_FEATURE_MINSZ = 8
