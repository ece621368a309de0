"""``vmferry host serve --profile/--mitigation``: the host's profile, checked before the
daemon starts, reported by ``GET /v1/host`` and used to build VMs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vmferry.cli.host import host_profile
from vmferry.cli.main import cli
from vmferry.errors import ApiError, ConfigError
from vmferry.host.api import host_profile_json
from vmferry.host.daemon import HostDaemon
from vmferry.hw.kvm.arm64_fw import WaLevel
from vmferry.machine.vm import HostContext


def test_profile_and_mitigation() -> None:
    assert host_profile(None, None) is None
    profile = host_profile("arm64-linux-5.3", "wa1=not_avail,wa2=avail,wa3=not_required")
    assert profile is not None and profile.mitigation is not None
    assert (profile.mitigation.wa1, profile.mitigation.wa3) == (WaLevel.NOT_AVAIL,
                                                                WaLevel.NOT_REQUIRED)
    default = host_profile("arm64-linux-5.3", None)
    assert default is not None and default.mitigation != profile.mitigation


@pytest.mark.parametrize(("profile", "mitigation", "match"), [
    ("arm64-linux-9.9", None, "unknown host profile"),
    (None, "avail", "needs --profile"),
    ("arm64-linux-5.3", "sometimes", "bad mitigation"),
])
def test_bad_options_stop_before_the_daemon_starts(profile: str | None, mitigation: str | None,
                                                   match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        host_profile(profile, mitigation)
    args = ["host", "serve", "--name", "h", "--state-dir", f"{tmp_path}/h"]
    args += ["--profile", profile] if profile else []
    args += ["--mitigation", mitigation] if mitigation else []
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, ConfigError)
    assert not (tmp_path / "h").exists()


def test_the_daemon_reports_and_uses_its_profile(tmp_path: Path) -> None:
    generic = HostDaemon("g", tmp_path / "g")
    profiled = HostDaemon("p", tmp_path / "p",
                          context=HostContext("p", host_profile("arm64-linux-5.3", "not_avail")))
    try:
        assert host_profile_json(generic) == {"profile": None, "mitigation": None}
        assert host_profile_json(profiled) == {"profile": "arm64-linux-5.3", "arch": "arm64",
                                               "kernel": "5.3", "mitigation": "not_avail"}
        definition = {"name": "a", "arch": "arm64", "memory_mib": 1}
        with pytest.raises(ApiError, match="no arm64 profile"):
            generic.expect_incoming("a", definition, False, "peer")
        assert generic.incoming == {} and generic.jobs == {}
        inc, caps = profiled.expect_incoming("a", definition, False, "peer")
        assert caps["arm64"]["profile"] == "arm64-linux-5.3" and inc.vm == "a"
    finally:
        generic.store.close()
        profiled.store.close()
