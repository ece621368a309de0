"""Errors, hazards and errno values of the IOMMU probe model.

Kernel paths of the model return ``0`` or a negative errno exactly like the kernel (the
probe code branches on the values: -ENODEV is "not behind this IOMMU", -EPROBE_DEFER is
"try later").  Misuse of the model's own API raises :class:`IommuError`.  Bugs the model
detects in itself raise hazards (:class:`~vmferry.errors.HazardError` subclasses).
"""

from __future__ import annotations

from enum import IntEnum

from vmferry.errors import HazardError, KernelError


class Errno(IntEnum):
    """Kernel errno values used by the probe paths (positive; functions return -value)."""

    ENOENT = 2
    ENOMEM = 12
    EBUSY = 16
    EEXIST = 17
    ENODEV = 19
    EINVAL = 22
    ETIMEDOUT = 110
    EPROBE_DEFER = 517


class IommuError(KernelError):
    """The IOMMU model refused an operation (bad topology, unknown device, ...)."""


class NullDeref(HazardError):
    """A pointer that must be valid was NULL (the kernel would oops)."""

    hazard = "null-deref"


class LockdepError(HazardError):
    """A lock the code asserts to be held is not held by the running thread."""

    hazard = "lockdep"


class LockError(HazardError):
    """A lock was released by a thread that does not own it."""

    hazard = "lock-error"


class MemoryLeak(HazardError):
    """Heap objects are live but no longer reachable from any root."""

    hazard = "memory-leak"


def errname(ret: int) -> str:
    """``-19`` -> ``"-ENODEV"``; ``0`` -> ``"0"``."""
    if ret >= 0:
        return str(ret)
    try:
        return f"-{Errno(-ret).name}"
    except ValueError:
        return str(ret)
