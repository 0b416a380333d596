"""The `nixery` command line. The only place errors become exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from nixery import configfile
from nixery.errors import ConfigError, NixeryError


def default_storage_path() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "nixery")


def default_source_cache() -> str:
    from nixery.packages.sources import default_cache_dir

    return default_cache_dir()


def default_gc_roots_dir() -> str:
    from nixery.packages.nix import default_gc_roots_dir

    return default_gc_roots_dir()


def _load_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`--config FILE`: TOML whose keys are the long option names."""
    if value:
        try:
            ctx.default_map = configfile.load_defaults(ctx.command, value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from exc
    return value


def _apply(command: Any, options: list[Any]) -> Any:
    """Decorate `command` with `options`, listed in the order --help shows them."""
    for option in reversed(options):
        command = option(command)
    return command


def _source_options(command: Any) -> Any:
    """Where the package set comes from; shared by every command that builds."""
    options = [
        click.option(
            "--pkgs-path",
            envvar=["NIXERY_PKGS_PATH"],
            help="A Nix file or directory with the package set.",
        ),
        click.option(
            "--channel",
            envvar=["NIXERY_CHANNEL"],
            help="A nixpkgs channel name or commit (default nixos-unstable).",
        ),
        click.option(
            "--pkgs-repo",
            envvar=["NIXERY_PKGS_REPO"],
            help="A git repository with the package set.",
        ),
        click.option(
            "--default-pkgs-path",
            envvar="NIXERY_DEFAULT_PKGS_PATH",
            help="The package set to use when no source is configured (default: the channel).",
        ),
        click.option(
            "--flake",
            envvar="NIXERY_FLAKE",
            help="A flake whose legacyPackages or packages are the package set.",
        ),
        click.option(
            "--channel-url",
            envvar="NIXERY_CHANNEL_URL",
            help="Tarball URL template for a nixpkgs commit ({rev}); default: GitHub's archive.",
        ),
        click.option(
            "--channel-revision-url",
            envvar="NIXERY_CHANNEL_REVISION_URL",
            help="URL template of a channel's git-revision file ({channel}).",
        ),
        click.option(
            "--channel-ttl",
            type=click.FloatRange(min=0),
            default=600,
            show_default=True,
            envvar="NIXERY_CHANNEL_TTL",
            help="Seconds a resolved channel, branch, flake or local path is trusted.",
        ),
        click.option(
            "--allow-tag-versions",
            is_flag=True,
            envvar="NIXERY_ALLOW_TAG_VERSIONS",
            help="Channel mode: tags may name another channel or a nixpkgs commit.",
        ),
        click.option(
            "--source-cache",
            default=default_source_cache,
            show_default="$XDG_CACHE_HOME/nixery-sources",
            envvar="NIXERY_SOURCE_CACHE",
            help="Directory for git mirrors and GC roots of fetched package sets.",
        ),
        click.option(
            "--gc-roots-dir",
            default=default_gc_roots_dir,
            show_default="$XDG_CACHE_HOME/nixery-gc-roots",
            envvar="NIXERY_GC_ROOTS_DIR",
            help="Directory for the GC roots that keep an image's derivations and store paths "
            "from its evaluation until packed; "
            "the Nix garbage collector must see it (not a private /tmp).",
        ),
        click.option(
            "--overlay",
            "overlays",
            multiple=True,
            type=click.Path(exists=True),
            envvar="NIXERY_OVERLAYS",
            help="A nixpkgs overlay: a file, or a directory with a default.nix; repeatable.",
        ),
    ]
    return _apply(command, options)


def _layering_options(command: Any) -> Any:
    """How layers are grouped and compressed; shared by `serve` and `build`."""
    options = [
        click.option(
            "--popularity",
            envvar=["NIX_POPULARITY_URL", "NIXERY_POPULARITY"],
            help="Popularity JSON file or URL; a URL with {channel} or {revision} is"
            " fetched for each package set revision.",
        ),
        click.option(
            "--layer-budget",
            type=click.IntRange(1, 124),
            default=94,
            show_default=True,
            envvar="NIXERY_LAYER_BUDGET",
            help="Package layers per image; the root file system layer comes on top.",
        ),
        click.option(
            "--compression-level",
            type=click.IntRange(0, 3),
            default=1,
            show_default=True,
            envvar="NIXERY_COMPRESSION_LEVEL",
            help="gzip (ISA-L) level.",
        ),
    ]
    return _apply(command, options)


def _storage_options(command: Any) -> Any:
    """Which storage backend; shared by `serve` and `gc` (the S3 options come apart)."""
    options = [
        click.option(
            "--storage-backend",
            type=click.Choice(["filesystem", "s3"]),
            default="filesystem",
            show_default=True,
            envvar=["NIXERY_STORAGE_BACKEND"],
        ),
        click.option(
            "--storage-path",
            default=default_storage_path,
            show_default="$XDG_CACHE_HOME/nixery",
            envvar=["STORAGE_PATH", "NIXERY_STORAGE_PATH"],
        ),
    ]
    return _apply(command, options)


def _s3_options(command: Any) -> Any:
    """Where the S3 backend's bucket is; shared by `serve` and `gc`."""
    options = [
        click.option("--s3-bucket", envvar="NIXERY_S3_BUCKET", help="S3 bucket (s3 backend)."),
        click.option("--s3-prefix", envvar="NIXERY_S3_PREFIX", help="Key prefix in the bucket."),
        click.option(
            "--s3-endpoint",
            envvar="NIXERY_S3_ENDPOINT",
            help="S3 endpoint URL, for stores other than AWS (default: the AWS chain).",
        ),
        click.option("--s3-region", envvar="NIXERY_S3_REGION", help="S3 region."),
        click.option(
            "--s3-path-style",
            is_flag=True,
            envvar="NIXERY_S3_PATH_STYLE",
            help="Address the bucket in the URL path instead of the host name.",
        ),
    ]
    return _apply(command, options)


def _scale_out_options(command: Any) -> Any:
    """Options for object storage and remote builders."""
    options = [
        _s3_options,
        click.option(
            "--s3-redirect",
            type=click.Choice(["on", "off"]),
            default="on",
            show_default=True,
            envvar="NIXERY_S3_REDIRECT",
            help="Redirect blob downloads to presigned URLs, or stream them through Nixery.",
        ),
        click.option(
            "--s3-presign-expiry",
            type=click.IntRange(1, 7 * 24 * 3600),
            default=900,
            show_default=True,
            envvar="NIXERY_S3_PRESIGN_EXPIRY",
            help="Seconds a presigned blob URL stays valid.",
        ),
        click.option(
            "--blob-base-url",
            envvar="NIXERY_BLOB_BASE_URL",
            help="Redirect blob downloads to this URL + the object key (a CDN before the bucket).",
        ),
        click.option(
            "--nix-builders",
            envvar="NIXERY_NIX_BUILDERS",
            help="Nix remote builders, passed to Nix as its 'builders' setting.",
        ),
    ]
    return _apply(command, options)


def _security_options(command: Any) -> Any:
    """Limits, access control and TLS for `serve` (README, "Security")."""
    options = [
        click.option(
            "--max-packages",
            type=click.IntRange(1, 1000),
            default=64,
            show_default=True,
            envvar="NIXERY_MAX_PACKAGES",
            help="Most path components (packages) in one image name.",
        ),
        click.option(
            "--max-image-size",
            envvar="NIXERY_MAX_IMAGE_SIZE",
            help="Largest closure (NAR size) an image may have, e.g. 2G; default: no limit.",
        ),
        click.option(
            "--auth",
            envvar="NIXERY_AUTH",
            help="htpasswd:FILE (HTTP Basic) or token:FILE (Docker token flow); bcrypt entries.",
        ),
        click.option(
            "--auth-key",
            type=click.Path(dir_okay=False),
            envvar="NIXERY_AUTH_KEY",
            help="File with the key signing tokens (created if missing); default: per process.",
        ),
        click.option(
            "--token-realm",
            envvar="NIXERY_TOKEN_REALM",
            help="Public URL of /token for clients (default: from the request's Host).",
        ),
        click.option(
            "--read-only-cache",
            is_flag=True,
            default=False,
            envvar="NIXERY_READ_ONLY_CACHE",
            help="Anonymous clients pull only cached images and start no builds.",
        ),
        click.option("--tls-cert", type=click.Path(dir_okay=False), envvar="NIXERY_TLS_CERT"),
        click.option("--tls-key", type=click.Path(dir_okay=False), envvar="NIXERY_TLS_KEY"),
        click.option(
            "--rate-limit",
            type=click.FloatRange(min=0),
            default=0,
            envvar="NIXERY_RATE_LIMIT",
            help="Requests per second per client address; 0: no limit.",
        ),
        click.option(
            "--rate-burst",
            type=click.IntRange(min=1),
            default=200,
            show_default=True,
            envvar="NIXERY_RATE_BURST",
            help="Requests a client may send at once before the rate limit applies.",
        ),
        click.option(
            "--head-timeout",
            type=click.FloatRange(min=0.5),
            default=5,
            show_default=True,
            envvar="NIXERY_HEAD_TIMEOUT",
            help="Seconds a client has to send a whole request, from connecting "
            "(or from its first byte on a kept-alive connection).",
        ),
        click.option(
            "--idle-timeout",
            type=click.FloatRange(min=1),
            default=60,
            show_default=True,
            envvar="NIXERY_IDLE_TIMEOUT",
            help="Seconds a kept-alive connection may wait for its next request.",
        ),
        click.option(
            "--send-timeout",
            type=click.FloatRange(min=0.5),
            default=10,
            show_default=True,
            envvar="NIXERY_SEND_TIMEOUT",
            help="Seconds a client may take to accept each 64 KiB of a response.",
        ),
        click.option(
            "--max-connections-per-address",
            type=click.IntRange(min=0),
            default=512,
            show_default=True,
            envvar="NIXERY_MAX_CONNECTIONS_PER_ADDRESS",
            help="Open connections per client address; beyond: 429 and close. 0: no limit.",
        ),
        click.option(
            "--max-active-per-address",
            type=click.IntRange(min=0),
            default=16,
            show_default=True,
            envvar="NIXERY_MAX_ACTIVE_PER_ADDRESS",
            help="Requests per client address handled at once; further ones wait "
            "without holding a thread. 0: no limit.",
        ),
        click.option(
            "--trusted-proxies",
            envvar="NIXERY_TRUSTED_PROXIES",
            help="Comma-separated addresses or networks of proxies: their connections are "
            "not limited per address, and X-Forwarded-For names the client.",
        ),
    ]
    return _apply(command, options)


@click.group()
@click.version_option(package_name="nixery")
def main() -> None:
    """Nixery: a container registry that builds images on demand with Nix."""


@main.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config_file,
    is_eager=True,
    expose_value=False,
    envvar="NIXERY_CONFIG",
    help="TOML file whose keys are these options' long names.",
)
@click.option("--host", default="0.0.0.0", show_default=True, envvar="NIXERY_HOST")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    envvar=["PORT", "NIXERY_PORT"],
)
@_source_options
@_storage_options
@click.option(
    "--nix-timeout",
    type=click.FloatRange(min=1),
    default=60,
    show_default=True,
    envvar=["NIX_TIMEOUT", "NIXERY_NIX_TIMEOUT"],
    help="Seconds a Nix step may take.",
)
@_layering_options
@click.option(
    "--platforms",
    default=None,
    envvar="NIXERY_PLATFORMS",
    help="Comma-separated platforms to build, e.g. linux/amd64,linux/arm64 (default: host).",
)
@_scale_out_options
@click.option(
    "--compression",
    type=click.Choice(["gzip", "zstd"]),
    default="gzip",
    show_default=True,
    envvar="NIXERY_COMPRESSION",
    help="Layer compression for OCI manifests; Docker manifests always get gzip.",
)
@click.option(
    "--zstd-level",
    type=click.IntRange(1, 19),
    default=3,
    show_default=True,
    envvar="NIXERY_ZSTD_LEVEL",
)
@click.option(
    "--nix-snapshotter",
    is_flag=True,
    default=False,
    envvar="NIXERY_NIX_SNAPSHOTTER",
    help="Annotate the store layers of OCI manifests for nix-snapshotter.",
)
@click.option(
    "--max-builds",
    type=click.IntRange(min=1),
    default=None,
    show_default="number of cores",
    envvar="NIXERY_MAX_BUILDS",
    help="Images built at the same time.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    envvar="NIXERY_MAX_QUEUE",
    help="Further images that may wait for a build; beyond that: 429 with Retry-After.",
)
@click.option(
    "--max-waiting",
    type=click.IntRange(min=1),
    default=48,
    show_default=True,
    envvar="NIXERY_MAX_WAITING",
    help="Requests that may wait for builds at once; beyond that: 429 with Retry-After. "
    "The server keeps further threads for everything else (cached images, blobs, probes).",
)
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=1),
    default=30,
    show_default=True,
    envvar="NIXERY_LEASE_TTL",
    help="Seconds after which a replica's lease on a build in the shared storage expires "
    "if it stops renewing it (it died); another replica then takes the build over.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="NIXERY_LOG_LEVEL",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="NIXERY_LOG_FORMAT",
    help="One line per event: readable text, or JSON.",
)
@_security_options
def serve(**options: Any) -> None:
    """Serve images over the registry protocol."""
    from nixery.config import Settings
    from nixery.http.server import RESERVED_THREADS
    from nixery.http.server import serve as run_server
    from nixery.ops.metrics import Metrics
    from nixery.runtime import build_app

    _setup_logging(options["log_level"], options["log_format"])
    try:
        settings = Settings.from_options(options)
        metrics = Metrics()
        app = build_app(settings, metrics)
        threads = settings.max_waiting + RESERVED_THREADS
        security = settings.security
        run_server(app, settings.host, settings.port, threads, tls=security.tls,
                   limits=security.connections, events=metrics)  # fmt: skip
    except NixeryError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@_storage_options
@_s3_options
@click.option(
    "--keep-days",
    type=click.FloatRange(min=0),
    default=30,
    show_default=True,
    envvar="NIXERY_KEEP_DAYS",
    help="Keep images served or built within this many days.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=3600,
    show_default=True,
    help="Seconds a new or expired entry is kept, so builds and pulls in progress finish.",
)
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
def gc(keep_days: float, grace: float, dry_run: bool, **options: Any) -> None:
    """Remove expired images and the blobs no kept image references."""
    from nixery.config import s3_settings
    from nixery.ops.gc import collect
    from nixery.runtime import open_storage

    _setup_logging("info")
    try:
        s3 = s3_settings(options)
        storage = open_storage(s3, options["storage_path"], clean_tmp=not dry_run)
        try:
            report = collect(storage, keep_days * 86400, grace, dry_run=dry_run)
        finally:
            storage.close()
    except NixeryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report.summary(dry_run))


@main.command("check-config")
@click.option(
    "--syntax-only",
    is_flag=True,
    help="Check option names and values only, not that named files exist "
    "(for checking at build time, where files outside the Nix store are not visible).",
)
@click.argument("file", type=click.Path(dir_okay=False))
def check_config(file: str, syntax_only: bool) -> None:
    """Check a `serve --config` FILE the way `serve` reads it, without serving."""
    from nixery.config import Settings

    try:
        configfile.check(serve, file, Settings.from_options, syntax_only=syntax_only)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{file}: ok")


@main.command()
@click.argument("image")
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write: a directory for oci, a file for the archives.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["oci", "oci-archive", "docker-archive"]),
    default="oci",
    show_default=True,
    help="oci: an OCI image layout directory; oci-archive and docker-archive: a tar file"
    " for podman load or docker load.",
)
@_source_options
@click.option(
    "--storage-path",
    default=default_storage_path,
    show_default="$XDG_CACHE_HOME/nixery",
    envvar=["STORAGE_PATH", "NIXERY_STORAGE_PATH"],
    help="Cache of layers, shared with `nixery serve`.",
)
@click.option(
    "--platform",
    "platform_name",
    default=None,
    help="linux/amd64 or linux/arm64 (default: the host's, or arm64 if the name says so).",
)
@click.option("--nix-timeout", type=click.FloatRange(min=1), default=600, show_default=True)
@_layering_options
@click.option(
    "--sbom",
    is_flag=True,
    help="Also write the image's SBOMs next to the output: OUTPUT.spdx.json (SPDX 2.3) "
    "and OUTPUT.cdx.json (CycloneDX 1.6).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="One line per event: readable text, or JSON.",
)
def build(
    image: str, output: Path, fmt: str, platform_name: str | None, sbom: bool, **options: Any
) -> None:
    """Build IMAGE (NAME[:TAG], e.g. shell/git:latest) without a server."""
    from nixery.config import Settings
    from nixery.images import layout
    from nixery.images.activity import Activity, Fanout
    from nixery.ops.progress import console_progress
    from nixery.packages.names import parse_image_name, validate_tag
    from nixery.runtime import make_service

    _setup_logging(options.pop("log_level"), options.pop("log_format"))
    name, _, tag = image.partition(":")
    tag = tag or "latest"
    progress = console_progress(sys.stderr)
    try:
        request = parse_image_name(name)
        validate_tag(tag)
        defaults = {"host": "", "port": 0, "storage_backend": "filesystem"}
        settings = Settings.from_options(defaults | options | {"platforms": platform_name})
        activity = Activity()
        service = make_service(settings, Fanout(progress, activity))
        source = service.sources.resolve(tag)
        platform = request.platform or settings.platforms[0]
        built = service.image(request, source, platform, name, tag)
        if not activity.builds():
            progress.step(f"{name}:{tag} for {platform} is in the cache; nothing to build")
        progress.step(f"writing {fmt} to {output}")
        layout.write(service.storage, built, output, fmt, name, tag)
        sboms = layout.write_sboms(service.storage, built, output, fmt) if sbom else []
    except NixeryError as exc:
        raise click.ClickException(_explain(exc)) from exc
    finally:
        progress.close()
    for path in [output, *sboms]:
        click.echo(str(path))


@main.command()
@_source_options
@click.option("--tag", default="latest", show_default=True, help="The revision, as image tags say.")
@click.option(
    "--platform",
    "platform_name",
    default=None,
    help="linux/amd64 or linux/arm64 (default: the host's).",
)
@click.option(
    "--nix-timeout",
    type=click.FloatRange(min=1),
    default=3600,
    show_default=True,
    help="Seconds each Nix step (evaluating, one batch of builds) may take.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    default="-",
    show_default=True,
    help="Where to write the JSON (- for standard output).",
)
def popcount(tag: str, platform_name: str | None, output: str, **options: Any) -> None:
    """Count how many packages of the package set need each store path.

    Writes the popularity JSON that `serve --popularity` reads: for every
    top-level package that evaluates and builds, each store path name in its
    runtime closure counts once. Packages that fail are skipped.
    """
    from nixery.config import Settings
    from nixery.packages.popularity import dump_popularity
    from nixery.packages.popularity import popcount as count
    from nixery.packages.sources import Sources
    from nixery.runtime import make_nix

    unused = {"host": "", "port": 0, "storage_backend": "filesystem", "storage_path": "."}
    unused |= {"layer_budget": 1, "compression_level": 1}
    try:
        settings = Settings.from_options(unused | options | {"platforms": platform_name})
        nix = make_nix(settings)
        sources = Sources(settings.source, nix, settings.overlays, settings.nix_timeout)
        source = sources.nix_source(sources.resolve(tag))
        system = settings.platforms[0].nix_system
        with _progress("building packages") as progress:
            counted = count(nix, source, system, settings.overlays, progress)
    except NixeryError as exc:
        raise click.ClickException(_explain(exc)) from exc
    with click.open_file(output, "w", atomic=output != "-") as out:
        out.write(dump_popularity(counted.popularity))
    skipped = f"; skipped {', '.join(counted.skipped)}" if counted.skipped else ""
    click.echo(
        f"counted {counted.packages} packages, {len(counted.popularity)} names{skipped}", err=True
    )


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback that draws a bar on stderr once the total is known."""
    with ExitStack() as stack:
        bars: list[Any] = []

        def update(done: int, total: int) -> None:
            if not bars:
                bar = click.progressbar(length=total, label=label, file=sys.stderr)
                bars.append(stack.enter_context(bar))
            bars[0].update(done - bars[0].pos)

        yield update


def _explain(exc: NixeryError) -> str:
    """A build error as a person wants to read it on a terminal."""
    from nixery.errors import BuildFailed, RegistryError

    if isinstance(exc, RegistryError):
        detail = exc.detail if isinstance(exc.detail, dict) else {}
        text = exc.message + (f": {detail['reason']}" if "reason" in detail else "")
        for wrong, close in detail.get("suggestions", {}).items():
            text += f"\n  {wrong}: did you mean {' or '.join(close)}?"
        return text
    if isinstance(exc, BuildFailed) and exc.log_tail:
        return f"{exc.summary}\n{exc.log_tail}"
    return str(exc)


def _setup_logging(level: str, fmt: str = "text") -> None:
    from nixery.ops import logs

    logs.setup(level, fmt)


__all__ = ["ConfigError", "main"]
