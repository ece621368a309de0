from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("ci", parent=settings.get_profile("default"), max_examples=60)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# --- real KVM ---------------------------------------------------------------------------
# Tests marked ``kvm`` run real x86-64 guests on /dev/kvm.  Where KVM is not usable they
# skip, saying why -- unless VMFERRY_REQUIRE_KVM=1 (set by .ci/run when /dev/kvm is
# usable), which turns that skip into a failure.

import pytest  # noqa: E402

from vmferry.hw.x86.kvm import kvm_usable  # noqa: E402

KVM_USABLE, KVM_REASON = kvm_usable()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: runs real guests on /dev/kvm")
    if KVM_USABLE:
        from vmferry.host.vcpus import install_kick_handler

        install_kick_handler()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") is None or KVM_USABLE:
        return
    if os.environ.get("VMFERRY_REQUIRE_KVM") == "1":
        pytest.fail(f"KVM tests required (VMFERRY_REQUIRE_KVM=1) but KVM is not usable: "
                    f"{KVM_REASON}")
    pytest.skip(f"KVM not usable here: {KVM_REASON}")
