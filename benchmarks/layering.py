"""How many bytes a client downloads when it pulls a corpus of images in turn.

Two kinds of corpus:

- fixture: images from the offline package set in tests/fixtures/pkgs,
  served by the real registry (the app and cheroot server of `nixery serve`,
  in this process) and pulled one after the other with skopeo into ONE OCI
  layout, which skips blobs it already has. Bytes are counted as the server
  sends them (manifests, configs and layers, including each image's small
  root file system layer). Popularity comes from `nixery popcount` on the
  same package set.
- synthetic: package sets shaped like nixpkgs (see synthetic.py), 300+
  store paths per image; layers are computed by the pure functions and a
  layer's size is the sum of its paths' NAR sizes.

- small closures: a small synthetic package set whose images have 5-40
  store paths, all within the default budget.

Every corpus is laid out twice: with popularity data and without any (what
`nixery serve` does without `--popularity`). Each is laid out by: ours
(`nixery.assembly.layers.group_layers`), the classic algorithm
(baseline.py), one layer per image, and one layer per store path (the
ideal for sharing, which ignores the budget). The synthetic
corpora also show two reference points that are not algorithms a registry
could run: "known" groups paths needed by the same requestable packages, as
if every possible request had been seen; the oracle knows every image of
the corpus in advance and groups paths needed by exactly the same images.
At the default budget they also report the budget's pressure: how many
paths lie beyond each image's largest, their share of its bytes, and how
many groups of always-together paths they form.

    nice .venv/bin/python benchmarks/layering.py [--budgets 94,8,4] [--skip-fixture]

It prints tables; it asserts nothing except that no image has more layers
than the budget plus the root layer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import baseline_group_layers, one_layer_per_image, one_layer_per_path  # noqa: E402
from synthetic import Corpus, nixpkgs_like, small_closures  # noqa: E402

from nixery.assembly.layers import DEFAULT_BUDGET, LayerGroup, group_layers  # noqa: E402
from nixery.http.app import create_app  # noqa: E402
from nixery.http.server import make_server  # noqa: E402
from nixery.images.model import BuildSettings  # noqa: E402
from nixery.images.service import ImageService  # noqa: E402
from nixery.packages.nix import Nix, NixSource  # noqa: E402
from nixery.packages.popularity import Popularity, popcount  # noqa: E402
from nixery.packages.sources import SourceConfig, Sources  # noqa: E402
from nixery.storage import FilesystemStorage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_PKGS = ROOT / "tests" / "fixtures" / "pkgs"
os.environ.setdefault("NIX_CONFIG", "substituters =\nextra-platforms = aarch64-linux")

# Overlapping images, in the order a user might pull them.
FIXTURE_IMAGES = [
    "hello", "shell", "shell/hello", "curl", "shell/curl", "git", "shell/git", "python3",
    "curl/jq", "wget", "wget/curl", "jq/python3", "shell/python3", "python3/sqlite", "curl/git",
    "less/strace", "shell/strace", "bzip2/gzip/xz/zstd", "curl/git/shell/wget",
    "diffutils/file/findutils",
]  # fmt: skip

Layering = Callable[..., list[LayerGroup]]
STRATEGIES: dict[str, Layering] = {
    "ours": group_layers,
    "baseline": baseline_group_layers,
    "per image": one_layer_per_image,
    "ideal": one_layer_per_path,
}
BUDGET_FREE = ("per image", "ideal")  # the budget does not change these
DATA_MODES = ("with data", "no data")  # popularity data given, or none


@dataclass
class Pull:
    image: str
    paths: int
    layers: int
    bytes: int
    seconds: float = 0.0  # time spent grouping (synthetic only)


# -- the fixture corpus, through the real server and skopeo -------------------


class _Meter:
    """WSGI middleware counting the bytes of every response body."""

    def __init__(self, app: Callable[..., Any]):
        self.app = app
        self.sent = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return self._count(self.app(environ, start_response))

    def _count(self, body: Iterable[bytes]) -> Iterator[bytes]:
        try:
            for chunk in body:
                with self._lock:
                    self.sent += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close:
                close()


@contextmanager
def registry(
    storage: Path, layering: Layering, budget: int, popularity: Popularity
) -> Iterator[tuple[str, _Meter]]:
    service = ImageService(
        FilesystemStorage(storage),
        Nix(timeout=600),
        Sources(SourceConfig("path", str(FIXTURE_PKGS))),
        BuildSettings(layer_budget=budget),
        popularity,
        layering=layering,
    )
    meter = _Meter(create_app(service, service.storage))
    server = make_server(meter, "127.0.0.1", 0, threads=8)
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.bind_addr[1]}", meter
    finally:
        server.stop()
        thread.join(10)


def layout_layers(layout: Path, tag: str) -> int:
    index = json.loads((layout / "index.json").read_text())
    ref = "org.opencontainers.image.ref.name"
    [entry] = [m for m in index["manifests"] if m["annotations"][ref] == tag]
    digest = entry["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return len(manifest["layers"])


def pull_fixture(
    layering: Layering, budget: int, popularity: Popularity, closures: dict[str, int]
) -> list[Pull]:
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
        layout = Path(tmp) / "oci"
        pulls = []
        with registry(Path(tmp) / "storage", layering, budget, popularity) as (host, meter):
            for i, image in enumerate(FIXTURE_IMAGES):
                before = meter.sent
                tag = f"image{i}"
                subprocess.run(
                    ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                     f"docker://{host}/{image}", f"oci:{layout}:{tag}"],
                    check=True, timeout=600,
                )  # fmt: skip
                pulls.append(
                    Pull(image, closures[image], layout_layers(layout, tag), meter.sent - before)
                )
        return pulls


def fixture_closures(nix: Nix) -> dict[str, int]:
    from nixery.packages.names import parse_image_name

    source = NixSource("path", str(FIXTURE_PKGS))
    sizes = {}
    for image in FIXTURE_IMAGES:
        packages = nix.resolve(source, "x86_64-linux", parse_image_name(image).packages)
        sizes[image] = len(nix.closure(nix.realise(packages)).paths)
    return sizes


# -- synthetic corpora, from the pure functions --------------------------------


def lay_out(corpus: Corpus, layering: Layering, budget: int) -> list[Pull]:
    have: set[tuple[str, ...]] = set()
    pulls = []
    for image, graph in corpus.images:
        started = time.perf_counter()
        layers = layering(graph, corpus.popularity, budget, most_popular=corpus.most_popular)
        seconds = time.perf_counter() - started
        new = [layer for layer in layers if layer.paths not in have]
        have.update(layer.paths for layer in new)
        size = sum(graph.total_size(layer.paths) for layer in new)
        pulls.append(Pull(image, len(graph.paths), len(layers), size, seconds))
    return pulls


def grouped_total(
    corpus: Corpus,
    budget: int,
    needed_by: Mapping[str, frozenset[object]],
    value: Callable[[int, int], float],
) -> int:
    """Bytes downloaded if each image's layers were its paths grouped by who
    needs them, the `budget - 1` groups of highest `value(size, needers)`
    kept whole and the rest in one layer."""
    have: set[tuple[str, ...]] = set()
    total = 0
    for _, graph in corpus.images:
        groups: dict[frozenset[object], list[str]] = defaultdict(list)
        for p in graph.paths:
            groups[needed_by[p]].append(p)
        ranked = sorted(
            groups.items(),
            key=lambda kv: (-value(graph.total_size(kv[1]), len(kv[0])), sorted(kv[1])),
        )
        keep = max(budget - 1, 0) if len(ranked) > budget else len(ranked)
        layers = [tuple(sorted(paths)) for _, paths in ranked[:keep]]
        rest = sorted(p for _, paths in ranked[keep:] for p in paths)
        layers += [tuple(rest)] if rest else []
        for layer in layers:
            if layer not in have:
                have.add(layer)
                total += graph.total_size(layer)
    return total


def oracle(corpus: Corpus, budget: int) -> int:
    """Paths grouped by the images of the corpus that need them (known in
    advance); a group's value is the bytes the other images reuse."""
    needed_by: dict[str, set[object]] = defaultdict(set)
    for i, (_, graph) in enumerate(corpus.images):
        for p in graph.paths:
            needed_by[p].add(i)
    frozen = {p: frozenset(images) for p, images in needed_by.items()}
    return grouped_total(corpus, budget, frozen, lambda size, images: size * (images - 1))


def all_requests_known(corpus: Corpus, budget: int) -> int:
    """Paths grouped by the requestable packages that need them: what a
    registry could do had it seen every possible request (not which ones a
    client will make); largest groups kept whole."""
    needed_by: dict[str, set[object]] = defaultdict(set)
    for root, closure in corpus.requestable.items():
        for p in closure:
            needed_by[p].add(root)
    frozen = {p: frozenset(roots) for p, roots in needed_by.items()}
    return grouped_total(corpus, budget, frozen, lambda size, _: size)


@dataclass
class Pressure:
    """What the budget forces on one image: the paths beyond its `budget - 1`
    largest have to share layers, and they fall into `classes` groups of
    paths that always come together (same set of requestable packages
    needing them), so a layout keeps them apart only with that many layers."""

    crowded: int  # paths beyond the largest budget - 1
    share: float  # their part of the image's bytes
    classes: int


def budget_pressure(corpus: Corpus, budget: int) -> list[Pressure]:
    needed_by: dict[str, set[str]] = defaultdict(set)
    for root, closure in corpus.requestable.items():
        for p in closure:
            needed_by[p].add(root)
    rows = []
    for _, graph in corpus.images:
        by_size = sorted(graph.paths, key=lambda p: (-graph.paths[p].nar_size, p))
        crowded = by_size[max(budget - 1, 0) :]
        classes = {frozenset(needed_by[p]) for p in crowded}
        share = graph.total_size(crowded) / graph.total_size()
        rows.append(Pressure(len(crowded), share, len(classes)))
    return rows


def print_pressure(corpus: Corpus, budget: int) -> None:
    rows = budget_pressure(corpus, budget)

    def spread(values: list[float], fmt: str) -> str:
        values = sorted(values)
        return " / ".join(format(v, fmt) for v in (values[0], values[len(values) // 2], values[-1]))

    print(f"\n{corpus.name}, budget {budget}: beyond each image's {budget - 1} largest paths")
    print(f"  paths (min / median / max):                {spread([r.crowded for r in rows], 'd')}")
    print(f"  share of the image's bytes:                {spread([r.share for r in rows], '.3f')}")
    print(
        "  groups that always come together, knowing\n"
        f"  every package an image may request:        {spread([r.classes for r in rows], 'd')}"
    )


# -- reporting -----------------------------------------------------------------


def mb(n: float) -> str:
    return f"{n / 1e6:9.2f}"


def per_image_table(
    title: str, budget: int, runs: dict[str, list[Pull]], show_seconds: bool = False
) -> None:
    print(f"\n{title}, layer budget {budget} (+1 root layer): MB downloaded per image")
    names = list(STRATEGIES)
    head = f"{'image':32} {'paths':>5} {'layers ours/base':>16} " + " ".join(
        f"{n:>9}" for n in names
    )
    print(head + ("   ms ours/base" if show_seconds else ""))
    print("-" * len(head))
    for i, pull in enumerate(runs["ours"]):
        base = runs["baseline"][i]
        row = f"{pull.image[:32]:32} {pull.paths:5} {pull.layers:>7}/{base.layers:<8} "
        row += " ".join(mb(runs[n][i].bytes) for n in names)
        if show_seconds:
            row += f"   {pull.seconds * 1e3:5.1f}/{base.seconds * 1e3:.1f}"
        print(row)
    totals = {n: sum(p.bytes for p in runs[n]) for n in names}
    print("-" * len(head))
    print(f"{'total':32} {'':5} {'':16} " + " ".join(mb(totals[n]) for n in names))
    print(
        f"{'ratio to ideal':32} {'':5} {'':16} "
        + " ".join(f"{totals[n] / totals['ideal']:9.3f}" for n in names)
    )


@dataclass
class Summary:
    corpus: str
    budget: int
    totals: dict[str, int]
    max_layers: dict[str, int]
    oracle: int | None = None
    known: int | None = None  # all_requests_known


def summarize(corpus: str, budget: int, runs: dict[str, list[Pull]], extra: int) -> Summary:
    totals = {n: sum(p.bytes for p in pulls) for n, pulls in runs.items()}
    layers = {n: max(p.layers - extra for p in pulls) for n, pulls in runs.items()}
    return Summary(corpus, budget, totals, layers)


def print_summary(rows: list[Summary]) -> bool:
    print("\nSummary: total bytes relative to one layer per store path (the ideal)")
    head = (
        f"{'corpus':32} {'budget':>6} {'ideal MB':>9} {'ours':>7} {'baseline':>8} "
        f"{'per image':>9} {'known':>7} {'oracle':>7} {'ours vs base':>12} "
        f"{'max layers ours/base':>21}"
    )
    print(head)
    print("-" * len(head))
    ok = True
    for r in rows:
        ideal = r.totals["ideal"]
        references = " ".join(
            f"{total / ideal:7.3f}" if total is not None else f"{'-':>7}"
            for total in (r.known, r.oracle)
        )
        within = r.max_layers["ours"] <= r.budget and r.max_layers["baseline"] <= r.budget
        ok &= within
        print(
            f"{r.corpus[:32]:32} {r.budget:6} {ideal / 1e6:9.1f} "
            f"{r.totals['ours'] / ideal:7.3f} {r.totals['baseline'] / ideal:8.3f} "
            f"{r.totals['per image'] / ideal:9.3f} {references} "
            f"{r.totals['ours'] / r.totals['baseline']:12.3f} "
            f"{r.max_layers['ours']:>10}/{r.max_layers['baseline']:<10}"
            + ("" if within else "  OVER BUDGET")
        )
    print("(max layers are package layers; the fixture images have one root layer on top)")
    print("(known: grouped by the requestable packages needing each path, as if every possible")
    print(" request had been seen; oracle: grouped by the corpus images needing each path)")
    return ok


def run_fixture(budgets: list[int]) -> list[Summary]:
    nix = Nix(timeout=600)
    started = time.monotonic()
    popularity = popcount(nix, NixSource("path", str(FIXTURE_PKGS)), "x86_64-linux").popularity
    closures = fixture_closures(nix)
    print(f"fixture: popcount and closures in {time.monotonic() - started:.1f}s; pulling...")
    fixed = {n: pull_fixture(STRATEGIES[n], DEFAULT_BUDGET, {}, closures) for n in BUDGET_FREE}
    rows = []
    for mode in DATA_MODES:
        data = popularity if mode == "with data" else {}
        for budget in budgets:
            runs = {
                n: pull_fixture(STRATEGIES[n], budget, data, closures)
                for n in STRATEGIES
                if n not in BUDGET_FREE
            }
            runs.update(fixed)
            per_image_table(f"fixture corpus (real pulls with skopeo), {mode}", budget, runs)
            rows.append(summarize(f"fixture (skopeo), {mode}", budget, runs, extra=1))
    return rows


def run_synthetic(budgets: list[int], corpora: list[Corpus], verbose: bool) -> list[Summary]:
    rows = []
    for corpus in corpora:
        paths = [len(g.paths) for _, g in corpus.images]
        print(
            f"\n{corpus.name}: {len(corpus.images)} images of {min(paths)}-{max(paths)} paths,"
            f" {len(corpus.popularity)} packages counted"
        )
        fixed = {n: lay_out(corpus, STRATEGIES[n], DEFAULT_BUDGET) for n in BUDGET_FREE}
        for mode in DATA_MODES:
            laid = corpus if mode == "with data" else replace(corpus, popularity={})
            for budget in budgets:
                runs = {n: lay_out(laid, STRATEGIES[n], budget) for n in ("ours", "baseline")}
                runs.update(fixed)
                title = f"{corpus.name}, {mode}"
                if verbose or budget == DEFAULT_BUDGET:
                    per_image_table(title, budget, runs, show_seconds=True)
                if mode == "with data" and (verbose or budget == DEFAULT_BUDGET):
                    print_pressure(corpus, budget)
                row = summarize(title, budget, runs, extra=0)
                row.oracle = oracle(corpus, budget)
                row.known = all_requests_known(corpus, budget)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default=f"{DEFAULT_BUDGET},8,4")
    parser.add_argument("--seeds", default="1,2", help="synthetic corpora to build")
    parser.add_argument("--small-seeds", default="1", help="small-closure corpora to build")
    parser.add_argument("--skip-fixture", action="store_true", help="no Nix, no skopeo")
    parser.add_argument("--verbose", action="store_true", help="per-image synthetic tables")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = [] if args.skip_fixture else run_fixture(budgets)
    corpora = [nixpkgs_like(int(s)) for s in args.seeds.split(",") if s]
    corpora += [small_closures(int(s)) for s in args.small_seeds.split(",") if s]
    rows += run_synthetic(budgets, corpora, args.verbose)
    if not print_summary(rows):
        sys.exit("some image has more layers than the budget")


if __name__ == "__main__":
    main()
