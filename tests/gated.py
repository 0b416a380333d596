"""A package whose build waits until the test opens a gate.

It is added to the fixture package set by an overlay, and every instance
has a fresh nonce, so Nix really builds it each time. While it waits, the
builder prints a line, so a test can watch a build in progress.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

WAITING = "waiting for the gate"
OVERLAY = """final: prev: {
  @NAME@ = derivation {
    name = "@NAME@-1.0";
    pname = "@NAME@";
    version = "1.0";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    nonce = "@NONCE@";
    args = [ "sh" "-c" ''
      echo "@WAITING@"
      i=0
      while [ ! -e @GATE@ ] && [ $i -lt 1200 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
      echo "gate open"
      /bin/busybox mkdir -p $out/share
      echo @NONCE@ > $out/share/nonce
    '' ];
  } // { meta.description = "A package whose build waits for a test"; };
}
"""


@dataclass
class GatedPackage:
    name: str
    overlay: Path
    gate: Path
    directory: Path

    def open(self) -> None:
        self.gate.touch()

    def remove(self) -> None:
        self.open()  # let a build still waiting finish
        shutil.rmtree(self.directory, ignore_errors=True)


def make_gated_package(name: str = "gatedpkg") -> GatedPackage:
    # Builders run as nixbld users: the gate must be reachable by them.
    directory = Path(tempfile.mkdtemp(prefix="nixery-gate-"))
    directory.chmod(0o755)
    gate = directory / "gate"
    overlay = directory / "overlay.nix"
    text = OVERLAY
    for key, value in (("@NAME@", name), ("@NONCE@", uuid.uuid4().hex),
                       ("@WAITING@", WAITING), ("@GATE@", str(gate))):  # fmt: skip
        text = text.replace(key, value)
    overlay.write_text(text)
    return GatedPackage(name, overlay, gate, directory)
