"""The service definitions: systemd-analyze verify on the unit, plistlib on the launchd plist.

`systemd-analyze verify` checks that ExecStart's binary exists, and /usr/local/bin/routerd
does not here; the test verifies a copy whose ExecStart names a real executable and changes
nothing else. It also only *warns* (exit 0) on unknown keys or bad values, so the test fails
on any output about the unit, not only on the exit status.
"""

from __future__ import annotations

import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "routerd.service"
PLIST = ROOT / "launchd" / "ai.routerd.plist"
EXEC = "/usr/local/bin/routerd"


def directives(text: str) -> dict[str, dict[str, list[str]]]:
    """Section → key → values (systemd keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_directives() -> None:
    svc = directives(UNIT.read_text())["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Type"] == "notify"
    assert one["ExecStart"] == f"{EXEC} serve --config /etc/routerd/routerd.yaml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["User"] == one["Group"] == "routerd"
    assert one["StateDirectory"] == one["CacheDirectory"] == "routerd"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert one[key] == "true", key
    assert one["ProtectSystem"] == "strict"
    assert one["KillMode"] == "mixed"
    assert int(one["TimeoutStopSec"].rstrip("s")) > 30 + 10  # drain + worker stop defaults
    assert int(one["LimitNOFILE"]) >= 4096
    env = dict(e.split("=", 1) for e in svc["Environment"])
    assert env["ROUTERD_STATE_DIR"].startswith("%S/routerd")
    assert env["ROUTERD_MODELS_DIR"].startswith("%S/routerd")
    assert "PrivateDevices" not in one  # would hide the GPUs


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: `make test` installs Debian's systemd package"
    text = UNIT.read_text()
    assert f"ExecStart={EXEC} " in text
    real = shutil.which("true") or "/bin/true"
    unit = tmp_path / "routerd.service"
    unit.write_text(text.replace(f"ExecStart={EXEC} ", f"ExecStart={real} "))
    result = subprocess.run([analyze, "verify", str(unit)], check=False,
                            capture_output=True, text=True, timeout=50)
    output = result.stdout + result.stderr
    about_unit = [line for line in output.splitlines()
                  if "routerd" in line or str(tmp_path) in line]
    assert result.returncode == 0, output
    assert about_unit == [], output


def test_unit_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above would see a typo: systemd-analyze reports it (with exit status 0)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: `make test` installs Debian's systemd package"
    unit = tmp_path / "routerd.service"
    unit.write_text(UNIT.read_text().replace(f"ExecStart={EXEC} ", "ExecStart=/bin/true ")
                    .replace("ProtectHome=true", "ProtectHme=true"))
    result = subprocess.run([analyze, "verify", str(unit)], check=False,
                            capture_output=True, text=True, timeout=50)
    assert "ProtectHme" in result.stdout + result.stderr


def test_plist() -> None:
    with PLIST.open("rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "ai.routerd" == PLIST.stem
    args = plist["ProgramArguments"]
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    assert args[0].startswith("/") and args[1] == "serve"
    assert plist["RunAtLoad"] is True
    keep = plist["KeepAlive"]
    assert keep is True or (isinstance(keep, dict) and keep.get("SuccessfulExit") is False)
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert isinstance(plist[key], str) and plist[key].startswith("/"), key
    env = plist["EnvironmentVariables"]
    assert isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
    assert "/usr/local/bin" in env["PATH"].split(":")
    assert isinstance(plist["ExitTimeOut"], int) and plist["ExitTimeOut"] > 40
    assert isinstance(plist["SoftResourceLimits"]["NumberOfFiles"], int)
    known = {"Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "StandardOutPath",
             "StandardErrorPath", "EnvironmentVariables", "ThrottleInterval", "ExitTimeOut",
             "ProcessType", "SoftResourceLimits", "WorkingDirectory"}
    assert set(plist) <= known, set(plist) - known
    if shutil.which("plutil"):
        subprocess.run(["plutil", "-lint", str(PLIST)], check=True, timeout=30)
