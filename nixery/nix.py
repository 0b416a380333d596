"""The only module that runs Nix.

One small function per Nix operation, each returning typed values. Request
data reaches Nix only as a JSON file read by the checked-in `resolve.nix`.
The commands used (`nix-instantiate`, `nix-store`) behave the same on Nix
2.8 and current releases, so no experimental features are needed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from nixery import process
from nixery.errors import BuildFailed, CommandError, CommandTimeout, UnknownPackages
from nixery.graph import ClosureGraph, parse_registration

LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class NixSource:
    """Where the package set comes from, as `resolve.nix` understands it."""

    kind: str  # "path" or "tarball"
    location: str

    def to_json(self) -> dict[str, str]:
        key = "path" if self.kind == "path" else "url"
        return {"kind": self.kind, key: self.location}


@dataclass(frozen=True)
class ResolvedPackage:
    name: str  # as requested
    attr_path: str  # as found in the package set
    drv: str
    out: str
    output: str

    @property
    def installable(self) -> str:
        return f"{self.drv}!{self.output}"


@dataclass(frozen=True)
class Nix:
    """Runs Nix commands with a timeout and optional extra options."""

    timeout: float = 60.0
    extra_options: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] | None = None

    def _options(self) -> list[str]:
        argv: list[str] = []
        for name, value in sorted(self.extra_options.items()):
            argv += ["--option", name, value]
        return argv

    def _run(self, argv: list[str], what: str) -> process.Completed:
        try:
            return process.run(argv, timeout=self.timeout, env=self._environment())
        except CommandTimeout as exc:
            raise BuildFailed(
                f"{what} timed out after {self.timeout:g}s", _tail(exc.stderr)
            ) from exc
        except CommandError as exc:
            raise BuildFailed(f"{what} failed", _tail(exc.stderr)) from exc

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        # Builders run as nixbld users and need to reach their TMPDIR.
        if not _world_accessible(env.get("TMPDIR", "/tmp")):
            env["TMPDIR"] = "/tmp"
        return env

    def resolve(
        self,
        source: NixSource,
        system: str,
        packages: Sequence[str],
        overlays: Sequence[str] = (),
    ) -> list[ResolvedPackage]:
        """Look every name up at once; raise UnknownPackages naming all misses."""
        args: dict[str, Any] = {
            "source": source.to_json(),
            "system": system,
            "packages": list(packages),
            "overlays": list(overlays),
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="nixery-args-") as fh:
            json.dump(args, fh)
            fh.flush()
            os.chmod(fh.name, 0o644)
            with resources.as_file(resources.files("nixery") / "nixexprs" / "resolve.nix") as expr:
                argv = [
                    "nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode",
                    *self._options(), str(expr), "--argstr", "argsFile", fh.name,
                ]  # fmt: skip
                result = json.loads(self._run(argv, "evaluating the package set").stdout)
        if result["unknown"]:
            raise UnknownPackages(sorted(result["unknown"]))
        return [
            ResolvedPackage(p["name"], p["attrPath"], p["drv"], p["out"], p["output"])
            for p in result["packages"]
        ]

    def realise(self, packages: Sequence[ResolvedPackage]) -> list[str]:
        """Build (or substitute) the packages' outputs; return their store paths."""
        if not packages:
            return []
        argv = [
            "nix-store", "--realise", "--timeout", str(int(self.timeout)), *self._options(),
            *sorted({p.installable for p in packages}),
        ]  # fmt: skip
        outs = self._run(argv, "building the image's packages").stdout.split()
        wanted = {p.out for p in packages}
        missing = wanted - set(outs)
        if missing:
            raise BuildFailed("nix-store did not produce every output", "\n".join(sorted(missing)))
        return sorted(wanted)

    def closure(self, roots: Sequence[str]) -> ClosureGraph:
        """The runtime closure of `roots` with references and NAR sizes."""
        requisites = self._run(
            ["nix-store", "--query", "--requisites", *roots], "querying the closure"
        ).stdout.split()
        dump = self._run(["nix-store", "--dump-db", *requisites], "reading path info").stdout
        return ClosureGraph(tuple(sorted(set(roots))), parse_registration(dump))


def _tail(stderr: str) -> str:
    return "\n".join(stderr.strip().splitlines()[-LOG_TAIL_LINES:])


def _world_accessible(path: str) -> bool:
    try:
        return os.stat(path).st_mode & 0o005 == 0o005
    except OSError:
        return False
