"""The VFIO error: an errno as the kernel returns it, plus the device state where known."""

from __future__ import annotations

from vmferry.errors import KernelError
from vmferry.hw.vfio.states import DeviceState


class VfioError(KernelError):
    """A VFIO operation failed with ``errno``.

    ``state`` is the device's migration state after the failure when the model knows it
    (a failing SET does not report it through the uAPI: user space must GET).
    """

    def __init__(self, err: int, message: str = "", state: DeviceState | None = None) -> None:
        super().__init__(err, message)
        self.state = state
