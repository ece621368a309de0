"""VFIO stream_write misuse returns errnos, not AssertionError (issue 10, Why 17)."""

from __future__ import annotations

import errno

import pytest

from vmferry.hw.vfio import DeviceState, VfioError
from vmferry.testing.vfio import make

KINDS = ["mlx5", "pds", "hisi_acc"]


@pytest.mark.parametrize("kind", KINDS)
def test_issue10_17_stream_write_on_a_saving_fd_is_ebadf(kind: str) -> None:
    dev = make(kind)
    stream = dev.set_state(DeviceState.STOP_COPY)
    assert stream is not None
    with pytest.raises(VfioError) as err:
        dev.stream_write(stream, memoryview(b"\0" * 16))
    assert err.value.errno == errno.EBADF
    with pytest.raises(VfioError) as err:
        stream.write(b"\0" * 16)
    assert err.value.errno == errno.EBADF
    assert dev.driver is not None
    with pytest.raises(VfioError) as err:
        dev.driver.resume_write(stream, memoryview(b"\0" * 16))
    assert err.value.errno == errno.EBADF
    dev.set_state(DeviceState.RUNNING)  # the device goes on as before
    assert dev.run(5) == 5
