"""Blob download throughput: the largest layer of the 1 GB image with curl
to /dev/null, from Nixery, from Debian's `docker-registry` (distribution)
holding the same image after a `skopeo copy`, and from nginx serving
Nixery's blob directory as static files. Rounds interleave the servers, so
they share the machine's load.

Also the request rate for a small blob (the image config) over one
keep-alive connection: per-request overhead.

    .venv/bin/python -m benchmarks.serve [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import (
    OVERLAYS,
    Server,
    free_port,
    machine,
    manifest,
    nix_build,
    nixery,
    require,
    table,
    wait_http,
)

IMAGE = "bigdata1g"
OVERLAY = OVERLAYS / "bigdata-1g.nix"
SMALL_REQUESTS = 200


@contextmanager
def distribution(root: Path) -> Iterator[str]:
    """Debian's docker-registry on a free port; yields host:port."""
    port = free_port()
    config = root / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    with open(root / "registry.log", "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def beside_distribution(
    root: Path, image: str, copy_as: str, baseline: Path | None
) -> Iterator[tuple[Server, str, Server]]:
    """Nixery from this tree, Debian's distribution holding `image` as built
    there (copied with skopeo, named `copy_as`), and Nixery from `baseline`
    (this tree again without one), with `image` built in both Nixery servers;
    yields (this tree's server, distribution's host, the baseline's server)."""
    tree = Path(__file__).resolve().parent.parent
    (root / "dist").mkdir()
    with (
        nixery(storage=root / "new" / "storage", tree=tree) as new,
        distribution(root / "dist") as registry,
        nixery(storage=root / "old" / "storage", tree=baseline or tree) as old,
    ):
        manifest(new, image)
        manifest(old, image)
        subprocess.run(
            ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
             f"docker://{new.host}/{image}", f"docker://{registry}/{copy_as}:latest"],
            check=True, capture_output=True,
        )  # fmt: skip
        yield new, registry, old


@contextmanager
def nginx(root: Path, files: Path) -> Iterator[str]:
    """nginx serving `files` as static files (sendfile on); yields host:port."""
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes auto;
user root;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {files};
        default_type application/octet-stream;
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(root), "-e", f"{root}/err.log"])
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def curl(url: str) -> float:
    """Download `url` to /dev/null; MB/s."""
    out = subprocess.run(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    size, seconds = int(out[0]), float(out[1])
    return size / seconds / 1e6


def small_rate(url: str) -> float:
    """Requests per second for `url`, SMALL_REQUESTS times on one connection."""
    argv = ["curl", "-sS", "--fail", "-w", "%{time_total}\\n"]
    for _ in range(SMALL_REQUESTS):
        argv += ["-o", "/dev/null", url]
    times = [float(t) for t in subprocess.run(argv, capture_output=True, text=True,
                                              check=True).stdout.split()]  # fmt: skip
    return len(times) / sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="rounds over every server")
    runs = parser.parse_args().runs
    require("curl", "skopeo", "docker-registry", "nginx")
    nix_build(IMAGE, overlays=[OVERLAY])
    print(f"{machine()}")

    with (
        tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp,
        nixery("--overlay", str(OVERLAY)) as server,
        distribution(Path(tmp)) as registry,
        nginx(Path(tmp), server.storage / "blobs" / "sha256") as static,
    ):
        image = manifest(server, IMAGE)
        layer = max(image["layers"], key=lambda d: d["size"])
        digest, config = layer["digest"], image["config"]["digest"]
        subprocess.run(
            ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
             f"docker://{server.host}/{IMAGE}", f"docker://{registry}/bench/{IMAGE}:latest"],
            check=True, capture_output=True,
        )  # fmt: skip
        urls = {
            "nixery": f"{server.url}/v2/{IMAGE}/blobs/{{}}",
            "docker-registry (distribution 2.8)": f"http://{registry}/v2/bench/{IMAGE}/blobs/{{}}",
            "nginx (static files, sendfile)": f"http://{static}/{{}}",
        }

        def url(name: str, blob: str) -> str:
            hexpart = blob.split(":")[1]
            return urls[name].format(hexpart if name.startswith("nginx") else blob)

        for name in urls:  # warm the page cache and each server
            curl(url(name, digest))
        big: dict[str, list[float]] = {name: [] for name in urls}
        small: dict[str, list[float]] = {name: [] for name in urls}
        for _ in range(runs):
            for name in urls:
                big[name].append(curl(url(name, digest)))
                small[name].append(small_rate(url(name, config)))

    ref = "docker-registry (distribution 2.8)"
    stat = "nginx (static files, sendfile)"
    rows = []
    for name in urls:
        to_ref = statistics.median(a / b for a, b in zip(big[name], big[ref], strict=True))
        to_static = statistics.median(a / b for a, b in zip(big[name], big[stat], strict=True))
        small_ratio = statistics.median(a / b for a, b in zip(small[name], small[ref], strict=True))
        rows.append((name, max(big[name]), statistics.median(big[name]), to_ref, to_static,
                     statistics.median(small[name]), small_ratio))  # fmt: skip
    table(
        f"Blob download, largest layer {layer['size'] / 1e6:.0f} MB, curl to /dev/null "
        f"({runs} rounds)",
        ["server", "best MB/s", "median MB/s", "x distribution", "x nginx",
         f"small blob req/s ({SMALL_REQUESTS} keep-alive)", "req/s x distribution"],
        rows,
    )  # fmt: skip
    print("\nTarget: at least distribution's throughput. Ratios are medians of per-round ratios.")


if __name__ == "__main__":
    main()
