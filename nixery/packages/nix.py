"""The only module that runs Nix.

One small function per Nix operation, each returning typed values. Request
data reaches Nix only as a JSON file read by the checked-in `resolve.nix`.
The commands used (`nix-instantiate`, `nix-store`, `nix-prefetch-url`)
behave the same on Nix 2.8 and current releases. Flakes are experimental in
both, so only flake operations enable them, with a command-line option.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, NamedTuple

from nixery.errors import (
    BuildFailed,
    CommandError,
    CommandTimeout,
    SourceUnavailable,
    UnknownPackages,
)
from nixery.packages import process
from nixery.packages.graph import ClosureGraph, parse_path_info

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 30
# Refused names whose error is looked up (one evaluation each); the rest get
# a generic reason.
MAX_EXPLAINED = 4
MAX_REASON_LENGTH = 500
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
FLAKES = ["--extra-experimental-features", "nix-command flakes"]
NIX_COMMAND = ["--extra-experimental-features", "nix-command"]

# Store paths per command line when a command takes many (well below ARG_MAX).
PATHS_PER_CALL = 500

# How `resolve.nix` applied the overlays (its `overlaysApplied`), for people.
OVERLAY_MODES = {
    "overlays-argument": "passed to the package set's function as its `overlays` argument",
    "appendOverlays": "applied with the package set's `appendOverlays`",
    "on-top": (
        "laid on top of the package set (it takes no `overlays` argument): "
        "the set's own packages do not see their overrides"
    ),
}

# Receives Nix's stderr line by line while a command runs.
LogListener = Callable[[str], None]
# Told (packages done, packages in total) while a package set is built.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class NixSource:
    """Where the package set comes from, as `resolve.nix` understands it."""

    kind: str  # "path" (a file or directory to import) or "flake" (a locked flake URL)
    location: str

    def to_json(self) -> dict[str, str]:
        key = "path" if self.kind == "path" else "url"
        return {"kind": self.kind, key: self.location}


@dataclass(frozen=True)
class FlakeLock:
    """What `nix flake metadata` pinned a flake reference to."""

    url: str  # the locked flake URL, usable with builtins.getFlake
    locked: Mapping[str, Any]  # the locked attributes (rev, narHash, ...)


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
class PackageMetadata:
    """What the package set says about one output of a derivation the image
    was built from (None where it does not say), for bills of materials."""

    path: str  # the output's store path
    output: str | None = None  # the output's name (out, lib, bin, ...)
    name: str | None = None
    version: str | None = None
    licenses: tuple[str, ...] = ()  # SPDX ids
    homepage: str | None = None
    description: str | None = None
    source: str | None = None  # where the source was downloaded from

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> PackageMetadata:
        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) and value else None

        licenses = tuple(x for x in data.get("licenses") or () if isinstance(x, str) and x)
        return PackageMetadata(
            str(data["path"]), text("output"), text("name"), text("version"), licenses,
            text("homepage"), text("description"), text("source"),
        )  # fmt: skip


@dataclass(frozen=True)
class Resolution:
    """Resolved packages and the metadata of everything they were built from."""

    packages: list[ResolvedPackage]
    metadata: Mapping[str, PackageMetadata]  # output path -> its metadata


@dataclass(frozen=True)
class PackageInfo:
    """What the package set says about a name, for people looking it up."""

    name: str  # as asked
    attr_path: str
    version: str | None
    description: str | None


class Description(NamedTuple):
    """What `Nix.describe` found out about some names."""

    found: list[PackageInfo]  # the names that resolve
    refused: list[str]  # names that exist but refuse to evaluate
    attributes: list[str] | None  # the set's top-level names, if asked


@dataclass(frozen=True)
class PackageSetClosure:
    """The runtime closures of a package set's top-level packages."""

    graph: ClosureGraph  # roots: the output of every package that was built
    packages: Mapping[str, str]  # attribute -> output path, for those
    skipped: tuple[str, ...]  # attributes whose output could not be built


@dataclass(frozen=True)
class Nix:
    """Runs Nix commands with a timeout and optional extra options."""

    timeout: float = 60.0
    extra_options: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] | None = None
    _overlay_modes: _Once = field(default_factory=lambda: _Once(), compare=False, repr=False)
    # Where builds keep their temporary GC roots: a directory the collector
    # (the nix-daemon, or root) sees at the same path, so not a private /tmp.
    gc_roots_dir: str = field(default_factory=lambda: default_gc_roots_dir())

    def temporary_roots(self) -> AbstractContextManager[str]:
        """A directory of GC roots for one build, under `gc_roots_dir`."""
        return temporary_roots(self.gc_roots_dir)

    def _options(self) -> list[str]:
        argv: list[str] = []
        for name, value in sorted(self.extra_options.items()):
            argv += ["--option", name, value]
        return argv

    def _run(
        self,
        argv: list[str],
        what: str,
        timeout: float | None = None,
        on_log: LogListener | None = None,
        env: Mapping[str, str] | None = None,
    ) -> process.Completed:
        timeout = timeout or self.timeout
        environment = {**self._environment(), **(env or {})}
        try:
            return process.run(argv, timeout=timeout, env=environment, on_stderr=on_log)
        except CommandTimeout as exc:
            raise BuildFailed(f"{what} timed out after {timeout:g}s", _tail(exc.stderr)) from exc
        except CommandError as exc:
            raise BuildFailed(f"{what} failed", _tail(exc.stderr)) from exc

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        # nixpkgs reads these in every evaluation; what a name means must
        # depend on the configured package set only.
        for name in [n for n in env if n.startswith("NIXPKGS_ALLOW_")]:
            del env[name]
        # Builders run as nixbld users and need to reach their TMPDIR.
        if not _world_accessible(env.get("TMPDIR", "/tmp")):
            env["TMPDIR"] = "/tmp"
        return env

    def _evaluate(
        self,
        source: NixSource,
        args: dict[str, Any],
        on_log: LogListener | None = None,
        roots: str | None = None,
    ) -> Any:
        """Run `resolve.nix` on `args` (with `source`), handed over as a JSON file.

        With `roots` (a directory from `temporary_roots`), the derivations of
        the packages found get a GC root there before the evaluating process
        ends, so no garbage collection can delete them before they are built.
        """
        if roots is not None:
            args = {**args, "instantiate": True}
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="nixery-args-") as fh:
            json.dump({"source": source.to_json(), **args}, fh)
            fh.flush()
            os.chmod(fh.name, 0o644)
            with resources.as_file(resources.files("nixery.packages") / "nixexprs") as exprs:
                flakes = FLAKES if source.kind == "flake" else []
                # `nix-instantiate --eval` cannot add roots: with `roots`,
                # the result comes inside a derivation that is rooted instead.
                mode = (
                    ["--add-root", os.path.join(roots, "resolution"), "--indirect"]
                    if roots is not None
                    else ["--eval", "--strict", "--json", "--read-write-mode"]
                )
                argv = [
                    "nix-instantiate", *mode, *flakes, *self._options(),
                    str(exprs / "resolve.nix"), "--argstr", "argsFile", fh.name,
                ]  # fmt: skip
                config = {"NIXPKGS_CONFIG": str(exprs / "nixpkgs-config.nix")}
                completed = self._run(argv, "evaluating the package set", on_log=on_log, env=config)
        if roots is None:
            result = json.loads(completed.stdout)
        else:
            # nix-instantiate prints the root, a link to the derivation.
            argv = ["nix-store", "--query", "--binding", "result", completed.stdout.strip()]
            result = json.loads(self._run(argv, "reading the evaluation's result").stdout)
        self._report_overlays(result.get("overlaysApplied"), len(args.get("overlays") or ()))
        return result

    def _report_overlays(self, mode: str | None, count: int) -> None:
        """Log how the overlays were applied, once per way (a set that drops
        them silently was the cause of confusing unknown-package errors)."""
        if mode in OVERLAY_MODES and self._overlay_modes.first(mode):
            log.info("%d overlay(s) %s", count, OVERLAY_MODES[mode], extra={"overlays": mode})

    def resolve(
        self,
        source: NixSource,
        system: str,
        packages: Sequence[str],
        overlays: Sequence[str] = (),
        on_log: LogListener | None = None,
        roots: str | None = None,
    ) -> list[ResolvedPackage]:
        """Look every name up at once; raise UnknownPackages naming all misses
        and, with Nix's reason, every name that refuses to evaluate.

        With `roots` (a directory from `temporary_roots`, to be given to
        `realise` too), the packages' derivations are rooted there from the
        moment the evaluation writes them: without it they have no root
        until `realise` starts, and a garbage collection in between fails
        the build.
        """
        return self._resolve(source, system, packages, overlays, on_log, False, roots).packages

    def resolve_with_metadata(
        self,
        source: NixSource,
        system: str,
        packages: Sequence[str],
        overlays: Sequence[str] = (),
        on_log: LogListener | None = None,
        roots: str | None = None,
    ) -> Resolution:
        """`resolve`, with the metadata of the packages' build graphs read in
        the same evaluation (where a separate one would evaluate it all again)."""
        return self._resolve(source, system, packages, overlays, on_log, True, roots)

    def _resolve(
        self,
        source: NixSource,
        system: str,
        packages: Sequence[str],
        overlays: Sequence[str],
        on_log: LogListener | None,
        metadata: bool,
        roots: str | None = None,
    ) -> Resolution:
        args: dict[str, Any] = {
            "system": system,
            "packages": list(packages),
            "overlays": list(overlays),
        }
        try:
            result = self._evaluate(source, {**args, "metadata": metadata}, on_log, roots)
        except BuildFailed as exc:
            if not metadata:
                raise
            # Metadata is informative: `tryEval` cannot catch every error
            # (an `abort` in a `meta`), so without it the image still builds.
            log.warning("reading package metadata failed, evaluating without: %s", exc.log_tail)
            result = self._evaluate(source, args, on_log, roots)
        if result["unknown"] or result["refused"]:
            refused = sorted(result["refused"])
            reasons = {
                name: self._refusal(source, {**args, "packages": [name]})
                if i < MAX_EXPLAINED
                else "does not evaluate"
                for i, name in enumerate(refused)
            }
            raise UnknownPackages(
                sorted(result["unknown"]), reasons, overlays_applied=result.get("overlaysApplied")
            )
        resolved = [
            ResolvedPackage(p["name"], p["attrPath"], p["drv"], p["out"], p["output"])
            for p in result["packages"]
        ]
        entries = (PackageMetadata.from_json(m) for m in result.get("metadata") or ())
        # An output built by two derivations of the walk keeps the first one's entry.
        found: dict[str, PackageMetadata] = {}
        for entry in entries:
            found.setdefault(entry.path, entry)
        return Resolution(resolved, found)

    def _refusal(self, source: NixSource, args: dict[str, Any]) -> str:
        """Why the one package in `args` refuses to evaluate: the first
        paragraph of Nix's last error message (tryEval hides it)."""
        try:
            self._evaluate(source, {**args, "explain": True})
        except BuildFailed as exc:
            cause = exc.__cause__
            if isinstance(cause, CommandError):
                reason = _error_message(cause.stderr)
                if reason:
                    return reason
        return "does not evaluate"

    def describe(
        self,
        source: NixSource,
        system: str,
        names: Sequence[str],
        overlays: Sequence[str] = (),
        list_attributes: bool = False,
        timeout: float | None = None,
    ) -> Description:
        """Version and description of the names that resolve, the names that
        exist but refuse to evaluate and, if asked, the package set's
        top-level attribute names. Nothing is built."""
        args: dict[str, Any] = {
            "system": system,
            "packages": list(names),
            "overlays": list(overlays),
            "describe": True,
            "listAttributes": list_attributes,
        }
        # A caller's own bound (suggestions for a 404) replaces the general one.
        nix = replace(self, timeout=timeout) if timeout else self
        result = nix._evaluate(source, args)
        found = [
            PackageInfo(p["name"], p["attrPath"], p.get("version"), p.get("description"))
            for p in result["packages"]
        ]
        attributes = result.get("attributes")
        return Description(
            found, list(result["refused"]), list(attributes) if attributes is not None else None
        )

    def refusal(
        self, source: NixSource, system: str, name: str, overlays: Sequence[str] = ()
    ) -> str:
        """Nix's reason why `name` refuses to evaluate."""
        args = {"system": system, "packages": [name], "overlays": list(overlays)}
        return self._refusal(source, args)

    def version(self) -> str:
        """The Nix version, e.g. `nix-store (Nix) 2.8.0`; proves Nix can run."""
        return self._run(["nix-store", "--version"], "running nix-store").stdout.strip()

    def realise(
        self,
        packages: Sequence[ResolvedPackage],
        on_log: LogListener | None = None,
        roots: str | None = None,
    ) -> list[str]:
        """Build (or substitute) the packages' outputs; return their store paths.

        With `roots` (a directory from `temporary_roots`), the outputs get GC
        roots there, so a concurrent garbage collection cannot delete them
        before they are packed.
        """
        if not packages:
            return []
        add_root = ["--add-root", os.path.join(roots, "out")] if roots else []
        argv = [
            "nix-store", "--realise", "--timeout", str(int(self.timeout)), *add_root,
            *self._options(), *sorted({p.installable for p in packages}),
        ]  # fmt: skip
        printed = self._run(argv, "building the image's packages", on_log=on_log).stdout.split()
        # With --add-root, nix-store prints the roots (symlinks to the outputs).
        outs = [os.readlink(p) for p in printed] if roots else printed
        wanted = {p.out for p in packages}
        missing = wanted - set(outs)
        if missing:
            raise BuildFailed("nix-store did not produce every output", "\n".join(sorted(missing)))
        return sorted(wanted)

    def closure(self, roots: Sequence[str]) -> ClosureGraph:
        """The runtime closure of `roots` with references and NAR sizes."""
        # One call gives the closure with sizes and references (rather than
        # `nix-store --query --requisites`, then `--dump-db` of the result).
        paths = {}
        for some in _chunks(sorted(set(roots))):
            argv = ["nix", *NIX_COMMAND, "path-info", "--recursive", "--json", *some]
            paths.update(parse_path_info(self._run(argv, "querying the closure").stdout))
        return ClosureGraph(tuple(sorted(set(roots))), paths)

    def package_set_closure(
        self,
        source: NixSource,
        system: str,
        overlays: Sequence[str] = (),
        progress: Progress | None = None,
        batch: int = 16,
    ) -> PackageSetClosure:
        """Build every top-level package that evaluates and read the runtime
        closures of those that built; failures are skipped, not fatal."""
        args: dict[str, Any] = {"system": system, "overlays": list(overlays), "packages": []}
        attributes = self._evaluate(source, {**args, "listAttributes": True})["attributes"]
        # Roots keep the derivations, then what was built, from a concurrent
        # garbage collection.
        with self.temporary_roots() as roots:
            listed = self._evaluate(source, {**args, "packages": attributes}, roots=roots)
            by_out: dict[str, list[str]] = {}
            installable: dict[str, str] = {}
            for p in listed["packages"]:
                by_out.setdefault(p["out"], []).append(p["attrPath"])
                installable.setdefault(p["out"], f"{p['drv']}!{p['output']}")
            outs = sorted(by_out)
            for done in range(0, len(outs), batch):
                argv = ["nix-store", "--realise", "--keep-going"]
                argv += ["--add-root", os.path.join(roots, f"batch{done}"), *self._options()]
                argv += [installable[o] for o in outs[done : done + batch]]
                try:
                    self._run(argv, "building packages")
                except BuildFailed:
                    pass  # what did build is found below
                if progress:
                    progress(min(done + batch, len(outs)), len(outs))
            invalid: set[str] = set()
            for some in _chunks(outs):
                argv = ["nix-store", "--check-validity", "--print-invalid", *some]
                invalid.update(self._run(argv, "checking built packages").stdout.split())
            built = [o for o in outs if o not in invalid]
            graph = self.closure(built)
        return PackageSetClosure(
            graph,
            {attr: o for o in built for attr in by_out[o]},
            tuple(sorted(attr for o in invalid for attr in by_out[o])),
        )

    def fetch_tarball(self, url: str, timeout: float | None = None) -> str:
        """Download and unpack a tarball with one top directory into the store; its path."""
        argv = [
            "nix-prefetch-url", "--unpack", "--print-path", "--name", "source",
            *self._options(), url,
        ]  # fmt: skip
        lines = self._run(argv, f"fetching {url}", timeout).stdout.split()
        if not lines or not lines[-1].startswith("/nix/store/"):
            raise BuildFailed(f"fetching {url} printed no store path", " ".join(lines))
        return lines[-1]

    def add_root(self, path: str, link: str) -> None:
        """Keep `path` from garbage collection for as long as `link` points at it."""
        self._run(["nix-store", "--realise", "--add-root", link, path], "registering a GC root")

    def flake_metadata(self, ref: str, timeout: float | None = None) -> FlakeLock:
        """Lock a flake reference (fetching it into the store), never writing its lock file."""
        argv = [
            "nix", *FLAKES, "flake", "metadata", "--json", "--no-write-lock-file",
            *self._options(), ref,
        ]  # fmt: skip
        try:
            data = json.loads(self._run(argv, f"locking flake {ref}", timeout).stdout)
        except BuildFailed as exc:
            raise SourceUnavailable(f"{exc.summary}: {exc.log_tail}") from exc
        locked = data.get("locked")
        url = data.get("url")
        if not isinstance(locked, dict) or not isinstance(url, str):
            raise SourceUnavailable(f"nix flake metadata gave no locked reference for {ref}")
        return FlakeLock(url, locked)


class _Once:
    """Remembers which keys were seen, across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()

    def first(self, key: str) -> bool:
        """True the first time `key` is given."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True


def default_gc_roots_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "nixery-gc-roots")


@contextmanager
def temporary_roots(directory: str) -> Iterator[str]:
    """A directory for GC roots that live only as long as a build.

    The cache keeps layer tarballs, not store paths, so store paths need a
    root only from the evaluation (the derivations it writes) until the
    packing of their layers. Nix registers each root by the path of its
    link, and the collector follows that path in its own view of the file
    system: `directory` must be one it shares (a service's private /tmp is
    not).
    """
    os.makedirs(directory, exist_ok=True)
    remove_stale_roots(directory)
    path = tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=directory)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_roots(directory: str) -> None:
    """Remove the roots of builds whose process is gone (it crashed or was
    killed): unlike /tmp, the directory is not emptied at boot, and a stale
    root would keep its store paths forever."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        match = re.fullmatch(r"build-(\d+)-\w+", entry)
        if match and not _process_exists(int(match[1])):
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _chunks(items: Sequence[str], size: int = PATHS_PER_CALL) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _error_message(stderr: str) -> str:
    """The first paragraph of the last `error:` in Nix's output (older Nix
    prints the message alone, newer Nix after a few trace lines)."""
    lines = [ANSI_RE.sub("", line).strip() for line in stderr.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error:") and line[6:].strip()]
    if not starts:
        return ""
    paragraph: list[str] = []
    for line in lines[starts[-1] :]:
        if not line or line.startswith("(use '--show-trace'") or line.startswith("(stack trace"):
            break
        paragraph.append(line)
    message = " ".join(paragraph).removeprefix("error:").strip()
    return message[:MAX_REASON_LENGTH]


def _tail(stderr: str) -> str:
    return "\n".join(stderr.strip().splitlines()[-LOG_TAIL_LINES:])


def _world_accessible(path: str) -> bool:
    try:
        return os.stat(path).st_mode & 0o005 == 0o005
    except OSError:
        return False
