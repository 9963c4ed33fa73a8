"""The systemd unit (verify, security score) and install.sh run for real under --root."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edgehook.service"
SYSUSERS = REPO / "systemd" / "edgehook.sysusers"
INSTALL = REPO / "systemd" / "install.sh"
STARTER = REPO / "config" / "starter.yaml"
MAX_EXPOSURE = 1.5
# The only complaint `systemd-analyze verify` may make on a machine where
# edgehook is not installed.
ABSENT_BINARY = re.compile(
    r"Command /opt/edgehook/venv/bin/edgehook is not executable: No such file or directory")


@pytest.fixture(scope="module")
def analyze() -> str:
    """Path of systemd-analyze; skipped without it, except in CI, where that fails."""
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing in CI: .ci/run must install systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


def unit_directives(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of the unit, keys repeated as systemd allows."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_has_the_directives_edgehook_relies_on() -> None:
    d = unit_directives(UNIT.read_text())
    single = {k: v[-1] for k, v in d.items()}
    assert single["Type"] == "notify"
    assert single["ExecStart"] == (
        "/opt/edgehook/venv/bin/edgehook run -c /etc/edgehook/edgehook.yaml")
    assert single["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert single["WatchdogSec"] == "30"
    assert single["Restart"] == "on-failure"
    # exit 2 is a config error: restarting cannot fix it, so systemd must not loop
    assert single["RestartPreventExitStatus"] == "2"
    assert (single["User"], single["Group"], single["SupplementaryGroups"]) == (
        "edgehook", "edgehook", "gpio")
    for key in ("StateDirectory", "ConfigurationDirectory", "RuntimeDirectory"):
        assert single[key] == "edgehook"
    assert single["WorkingDirectory"] == "/run/edgehook"
    assert "LG_WD=/run/edgehook" in d["Environment"]
    assert "EDGEHOOK_CONFIG=/etc/edgehook/edgehook.yaml" in d["Environment"]
    assert d["LoadCredential"], "secrets come in through LoadCredential="
    assert set(d["After"][0].split()) >= {"network-online.target", "time-sync.target"}
    assert single["ProtectSystem"] == "strict"
    assert single["CapabilityBoundingSet"] == ""
    assert single["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert single["DevicePolicy"] == "closed"
    assert set(d["DeviceAllow"]) == {"char-gpiochip rw", "/dev/gpiomem rw"}
    assert "@system-service" in d["SystemCallFilter"]
    # Each of these would silently break GPIO on a Pi (see the unit's comments).
    for breaks_gpio in ("PrivateDevices", "PrivateUsers", "ProcSubset"):
        assert breaks_gpio not in d, f"{breaks_gpio}= breaks GPIO access"
    assert "IPAddressDeny" not in d, "webhooks must reach the internet"


def test_systemd_analyze_verify(analyze: str) -> None:
    proc = subprocess.run(
        [analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    complaints = [
        line for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and not ABSENT_BINARY.search(line)
    ]
    assert complaints == [], "\n".join(complaints)
    binary_present = Path("/opt/edgehook/venv/bin/edgehook").exists()
    assert proc.returncode == 0 or not binary_present


def test_systemd_analyze_security_exposure(analyze: str) -> None:
    # --threshold is the same gate on systemd's 0-100 scale: exit 1 above it.
    proc = subprocess.run(
        [analyze, "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
         "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for edgehook\.service: (\d+(?:\.\d+)?)",
                      proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE


# --- install.sh ----------------------------------------------------------

def test_install_sh_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_install_sh_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def make_root(base: Path, *, gpio: bool) -> Path:
    """A throwaway target root with the minimal account files useradd/sysusers edit."""
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    group = "root:x:0:\n" + ("gpio:x:997:\n" if gpio else "")
    (root / "etc" / "group").write_text(group)
    return root


def account_line(root: Path, file: str, name: str) -> list[str] | None:
    """The colon-split line for ``name`` in root/etc/<file>, or None."""
    for line in (root / "etc" / file).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def run_install(root: Path, *args: str, **env: str) -> str:
    """Run install.sh --root ROOT; return its output, failing the test on exit != 0."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("EDGEHOOK_STARTER_CONFIG", "EDGEHOOK_LGPIO")}
    full_env.update(env)
    proc = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args],
        capture_output=True, text=True, timeout=180, env=full_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


@pytest.fixture
def can_install() -> None:
    """Skips unless install.sh can run here (root, and a tool to create the user)."""
    if os.geteuid() != 0:
        pytest.skip("install.sh needs root (it chowns files and creates a user in the root)")
    if shutil.which("systemd-sysusers") is None and shutil.which("useradd") is None:
        pytest.skip("neither systemd-sysusers nor useradd is installed")


@pytest.mark.slow
def test_install_upgrade_uninstall_purge(tmp_path: Path, can_install: None) -> None:
    root = make_root(tmp_path, gpio=True)
    artefacts_before = set((REPO / "daemon").glob("*.egg-info")) | set(REPO.glob("build"))
    out = run_install(root)

    venv = root / "opt/edgehook/venv"
    edgehook = venv / "bin" / "edgehook"
    assert edgehook.is_file() and os.access(edgehook, os.X_OK)
    # on PATH for admins: a link to the venv's entry point, valid inside the root
    link = root / "usr/local/bin/edgehook"
    assert link.is_symlink() and os.readlink(link) == "/opt/edgehook/venv/bin/edgehook"
    # no lgpio from apt under --root: the venv keeps to itself
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    unit = root / "etc/systemd/system/edgehook.service"
    sysusers = root / "usr/lib/sysusers.d/edgehook.conf"
    assert unit.read_text() == UNIT.read_text()
    assert sysusers.read_text() == SYSUSERS.read_text()

    user = account_line(root, "passwd", "edgehook")
    group = account_line(root, "group", "edgehook")
    assert user is not None and group is not None
    assert user[6].endswith("nologin")
    assert "edgehook" in account_line(root, "group", "gpio")[3].split(",")

    config = root / "etc/edgehook/edgehook.yaml"
    st = config.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (0, int(group[2]))
    # the starter (reads the doorbell, sends nothing), never the example with placeholders
    assert config.read_text() == STARTER.read_text()
    assert f"installed /etc/edgehook/edgehook.yaml from {STARTER}" in out
    creds = root / "etc/edgehook/credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700

    # Honest about what a --root install in a container cannot do.
    assert "skipped: lgpio" in out
    assert "skipped: daemon-reload and start: --root install" in out
    # The installer leaves no build artefacts of its own in the checkout (`make test`'s
    # editable install may have made an egg-info already; that one is not ours).
    after = set((REPO / "daemon").glob("*.egg-info")) | set(REPO.glob("build"))
    assert after <= artefacts_before
    wants = root / "etc/systemd/system/multi-user.target.wants/edgehook.service"
    assert "'edgehook check' failed" not in out, out
    assert "config OK: 1 input, 0 outputs, 0 rules, 0 webhooks" in out
    if shutil.which("systemctl"):
        assert wants.is_symlink()

    # Second run: an in-place upgrade that keeps an edited config and the state.
    config.write_text(config.read_text() + "# edited by the owner\n")
    edited = config.read_text()
    state = root / "var/lib/edgehook"
    state.mkdir(parents=True)
    (state / "outbox.sqlite3").write_bytes(b"pending deliveries")
    out = run_install(root)
    assert "keeping the existing /etc/edgehook/edgehook.yaml" in out
    assert "upgrading the virtualenv" in out
    assert config.read_text() == edited
    assert (state / "outbox.sqlite3").read_bytes() == b"pending deliveries"
    assert edgehook.is_file()
    passwd = (root / "etc/passwd").read_text()
    assert passwd.count("\nedgehook:") == 1

    assert link.is_symlink()
    out = run_install(root, "--uninstall")
    assert not unit.exists() and not sysusers.exists() and not wants.exists()
    assert not venv.exists()
    assert not link.is_symlink() and not link.exists()
    assert config.read_text() == edited
    assert (state / "outbox.sqlite3").exists()

    run_install(root, "--purge")
    assert not (root / "etc/edgehook").exists()
    assert not state.exists()


@pytest.mark.slow
def test_install_without_gpio_group_uses_useradd_and_says_so(
    tmp_path: Path, can_install: None
) -> None:
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    root = make_root(tmp_path, gpio=False)
    # An admin's own /usr/local/bin/edgehook is left alone, and the install says so.
    own = root / "usr/local/bin/edgehook"
    own.parent.mkdir(parents=True)
    own.write_text("#!/bin/sh\necho mine\n")
    out = run_install(root, EDGEHOOK_USERADD="1")
    assert own.read_text() == "#!/bin/sh\necho mine\n"
    assert "skipped: /usr/local/bin/edgehook exists and is not a link" in out
    assert "skipped: gpio group membership" in out
    assert account_line(root, "passwd", "edgehook") is not None
    assert account_line(root, "group", "gpio") is None, "must not invent a gpio group"
    assert (root / "opt/edgehook/venv/bin/edgehook").is_file()
