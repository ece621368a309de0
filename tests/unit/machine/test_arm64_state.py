"""Persist contract of the arm64 machine component: save, encode, decode, strict errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import StreamDecodeError
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import KvmError
from vmferry.machine.arm64 import Arm64Machine, Arm64State, decode_state, encode_state
from vmferry.machine.profiles import load_profile


def machine() -> Arm64Machine:
    m = Arm64Machine(load_profile("arm64-linux-6.15"), n_vcpus=2)
    m.vcpus[1].core[R.CORE_REGS["v3"]] = (1 << 127) | 5
    m.vcpus[0].core[R.CORE_REGS["pc"]] = 0xFFFF000012345678
    return m


def test_round_trip() -> None:
    state = machine().save()
    assert decode_state(encode_state(state)) == state
    assert len(state.vcpus) == 2


@pytest.mark.parametrize("cut", [0, 3, 7, 9, 100, -1])
def test_truncation_is_typed(cut: int) -> None:
    data = encode_state(machine().save())
    with pytest.raises(StreamDecodeError):
        decode_state(data[:cut])


def test_bad_magic_version_trailing_negative_length() -> None:
    data = encode_state(machine().save())
    for bad in (b"XXXX" + data[4:], data[:4] + b"\x00\x02" + data[6:], data + b"\x00"):
        with pytest.raises(StreamDecodeError):
            decode_state(bad)
    one = encode_state(Arm64Machine(load_profile("arm64-linux-4.15")).save())
    cpreg_len_at = len(one) - 4 - 16 * len(
        Arm64Machine(load_profile("arm64-linux-4.15")).cpregs[0].ids)
    negative = one[:cpreg_len_at] + b"\xff\xff\xff\xff" + one[cpreg_len_at + 4:]
    with pytest.raises(StreamDecodeError, match="negative"):
        decode_state(negative)


def test_restore_core_and_load_into_started_vm_refused() -> None:
    src = machine()
    dst = Arm64Machine(load_profile("arm64-linux-6.15"), n_vcpus=2)
    dst.load(decode_state(encode_state(src.save())))
    assert dst.vcpus[1].core[R.CORE_REGS["v3"]] == (1 << 127) | 5
    dst.start()
    with pytest.raises(Exception, match="already run"):
        dst.load(src.save())


def test_bad_set_changes_nothing() -> None:
    m = machine()
    before = m.save()
    with pytest.raises(KvmError):
        m.vcpus[0].set_one_reg(R.KVM_REG_ARM_PSCI_VERSION, 0x10004)
    with pytest.raises(KvmError):
        m.vcpus[0].set_one_reg(R.KVM_REG_ARM_STD_BMAP, 0x6)
    assert m.save() == before


_SAMPLE = encode_state(Arm64Machine(load_profile("arm64-linux-5.19")).save())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.builds(
    lambda cut, flips: bytes(b ^ flips.get(i, 0) for i, b in enumerate(_SAMPLE[:cut])),
    st.integers(0, len(_SAMPLE)),
    st.dictionaries(st.integers(0, len(_SAMPLE) - 1), st.integers(1, 255), max_size=4)))
def test_decode_never_raises_untyped(data: bytes) -> None:
    try:
        state = decode_state(data)
    except StreamDecodeError as exc:
        assert str(exc), "a typed decode error must say what is wrong"
    else:
        assert isinstance(state, Arm64State)
