"""Issue 17, item 3: the mlx5-like device's MIG_DATA_SIZE in pre-copy is what STOP_COPY
will still produce (the FINAL delta), so the downtime estimate counts the dirty tail and
not the image that already moved before the stop."""

from __future__ import annotations

from vmferry.hw.vfio import DeviceState
from vmferry.testing.vfio import make, resume

S = DeviceState


def _drain(stream: object) -> bytes:
    out = bytearray()
    while chunk := stream.read(1 << 20):  # type: ignore[attr-defined]
        out += chunk
    return bytes(out)


def test_issue17_3_mlx5_stop_copy_size_in_precopy_is_the_final_delta() -> None:
    dev = make("mlx5")
    full = dev.data_size()
    stream = dev.set_state(S.PRE_COPY)
    assert stream is not None
    initial = stream.precopy_info().initial_bytes
    assert initial >= full - 64  # the whole image is pre-copy initial data
    pre = stream.read(initial)
    assert stream.precopy_info().initial_bytes == 0
    dev.run(2)  # the device dirties a few pages of its image
    estimate = dev.data_size()
    assert 56 < estimate < full // 2
    dev.set_state(S.PRE_COPY_P2P)
    dev.set_state(S.STOP_COPY)
    final = _drain(stream)
    assert len(final) == estimate  # the estimate is exactly what STOP_COPY produced
    digest = dev.state_digest()
    dst = make("mlx5")
    resume(dst, [pre, final])
    assert dst.state_digest() == digest


def test_issue17_3_mlx5_stop_copy_size_from_stop_is_the_whole_image() -> None:
    dev = make("mlx5")
    full = dev.data_size()
    dev.set_state(S.STOP)
    stream = dev.set_state(S.STOP_COPY)
    assert stream is not None and dev.data_size() == full
    assert len(_drain(stream)) == full
