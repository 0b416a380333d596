"""The set-up scripts on a machine where Nix cannot build yet.

Each test runs in a private mount namespace (bubblewrap) whose /etc is a copy
of the host's with the Nix build users removed: the state of a fresh Debian
machine with `nix-bin` installed without its recommended `nix-setup-systemd`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRIVIAL = ROOT / "scripts" / "nix-can-build.nix"

pytestmark = [
    pytest.mark.nix,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating system users needs root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]


def without_build_users(text: str) -> str:
    """An /etc/passwd, group, shadow or gshadow without any nixbld entry or member."""
    kept = []
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0].startswith("nixbld"):
            continue
        if len(fields) >= 4:
            members = [m for m in fields[-1].split(",") if m and not m.startswith("nixbld")]
            fields[-1] = ",".join(members)
        kept.append(":".join(fields))
    return "\n".join(kept) + "\n"


@pytest.fixture
def fresh_etc(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        path = etc / name
        if path.exists():
            path.write_text(without_build_users(path.read_text()))
    assert "nixbld" not in (etc / "group").read_text()
    return etc


def in_fresh_machine(etc: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv as root with `etc` as /etc; everything else is the host's."""
    wrapped = ["bwrap", "--bind", "/", "/", "--bind", str(etc), "/etc"]
    wrapped += ["--dev", "/dev", "--proc", "/proc", "--chdir", str(ROOT), "--", *argv]
    return subprocess.run(wrapped, capture_output=True, text=True, timeout=600)


def build_trivial(etc: Path) -> subprocess.CompletedProcess[str]:
    nonce = uuid.uuid4().hex  # a new derivation each time, so it is really built
    return in_fresh_machine(
        etc, "nix-build", "--no-out-link", str(TRIVIAL), "--argstr", "nonce", nonce
    )


def test_without_build_users_nix_check_stops_with_one_line(fresh_etc: Path) -> None:
    result = in_fresh_machine(fresh_etc, "scripts/nix-check")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "'nixbld'" in lines[0] and "fix: run scripts/bootstrap" in lines[0]


def test_bootstrap_makes_nix_build_without_build_users(fresh_etc: Path) -> None:
    before = build_trivial(fresh_etc)
    assert before.returncode != 0
    assert "group 'nixbld'" in before.stderr  # the fresh machine's failure is reproduced

    setup = in_fresh_machine(fresh_etc, "scripts/bootstrap", "--nix")
    assert setup.returncode == 0, setup.stderr
    built = build_trivial(fresh_etc)
    assert built.returncode == 0, built.stderr
    assert Path(built.stdout.strip()).is_file()
    assert in_fresh_machine(fresh_etc, "scripts/nix-check").returncode == 0


def test_build_users_are_system_users_without_login_and_rerun_changes_nothing(
    fresh_etc: Path,
) -> None:
    assert in_fresh_machine(fresh_etc, "scripts/nix-build-users").returncode == 0
    files = ("passwd", "group", "shadow", "gshadow")
    first = {name: (fresh_etc / name).read_text() for name in files}
    group = next(g.split(":") for g in first["group"].splitlines() if g.startswith("nixbld:"))
    users = [u.split(":") for u in first["passwd"].splitlines() if u.startswith("nixbld")]
    assert [u[0] for u in users] == [f"nixbld{i}" for i in range(1, 9)]
    assert group[3].split(",") == [u[0] for u in users]  # Nix picks users from the member list
    for _, _, uid, gid, _, home, shell in users:
        assert int(uid) < 1000 and gid == group[2]  # system users in the system group
        assert home == "/var/empty" and shell.endswith("/nologin")

    assert in_fresh_machine(fresh_etc, "scripts/nix-build-users").returncode == 0
    assert {name: (fresh_etc / name).read_text() for name in files} == first


def test_build_users_missing_from_the_member_list_are_added(fresh_etc: Path) -> None:
    """A user that exists with nixbld only as primary group is not a build user to Nix."""
    assert in_fresh_machine(fresh_etc, "scripts/nix-build-users").returncode == 0
    group_file = fresh_etc / "group"
    lines = group_file.read_text().splitlines()
    group_file.write_text(
        "\n".join(
            line.rsplit(":", 1)[0] + ":" if line.startswith("nixbld:") else line for line in lines
        )
        + "\n"
    )
    assert in_fresh_machine(fresh_etc, "scripts/nix-build-users").returncode == 0
    group = next(g for g in group_file.read_text().splitlines() if g.startswith("nixbld:"))
    assert group.split(":")[3].split(",") == [f"nixbld{i}" for i in range(1, 9)]
