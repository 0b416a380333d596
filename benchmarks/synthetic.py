"""Synthetic package sets shaped like nixpkgs, for the layering benchmark.

A few very popular roots (a C library, compiler runtime, core libraries)
that nearly everything needs; language ecosystems whose packages sit on long
chains of each other; a pool of generic libraries with preferential
attachment; applications on top. Images request a few applications, often
with a common "shell" set, so their closures overlap the way real images do.
Everything is derived from a seed, so runs are repeatable.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from nixery.packages.graph import ClosureGraph, StorePath
from nixery.packages.popularity import Popularity, count_popularity

KB = 1000
MB = 1000 * KB


@dataclass(frozen=True)
class Corpus:
    name: str
    images: list[tuple[str, ClosureGraph]]  # image name, closure
    popularity: Popularity
    most_popular: frozenset[str]  # store paths of packages every image has
    # Every package an image may request, with its closure: what a registry
    # would know if it had already seen every possible request.
    requestable: dict[str, frozenset[str]]


class _Universe:
    def __init__(self, rng: random.Random, sigma: float):
        self.rng = rng
        self.sigma = sigma
        self.refs: dict[str, tuple[str, ...]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, name: str, size: int, refs: list[str]) -> str:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        path = f"/nix/store/{digest}-{name}"
        self.refs[path] = tuple(sorted(set(refs)))
        self.sizes[path] = max(size, 1)
        return path

    def size(self, median: float) -> int:
        return int(self.rng.lognormvariate(0, self.sigma) * median)

    def pick(self, pool: list[str], k: int, weights: list[float] | None = None) -> list[str]:
        if not pool:
            return []
        return sorted(set(self.rng.choices(pool, weights=weights, k=k)))

    def graph(self, roots: list[str]) -> ClosureGraph:
        closure: set[str] = set()
        todo = list(roots)
        while todo:
            p = todo.pop()
            if p not in closure:
                closure.add(p)
                todo.extend(self.refs[p])
        paths = {p: StorePath(p, self.sizes[p], self.refs[p]) for p in closure}
        return ClosureGraph(tuple(sorted(set(roots))), paths)

    def corpus(
        self,
        name: str,
        images: int,
        draw: Callable[[], list[str]],
        fits: Callable[[int], bool],
        packages: list[str],
    ) -> Corpus:
        """`images` images of `draw()`'s packages plus the two that every
        image gets, each kept if `fits` its number of paths; the popularity
        data is a popcount of the whole set (those two not counted: every
        image has them anyway)."""
        cacert = self.add("nss-cacert-3.95", 500 * KB, [])
        iana = self.add("iana-etc-20231227", 600 * KB, [])
        popularity = count_popularity(self.graph(list(self.refs)))
        for top_level in (cacert, iana):
            popularity.pop(top_level.split("-", 1)[1], None)
        corpus: list[tuple[str, ClosureGraph]] = []
        while len(corpus) < images:
            requested = draw()
            graph = self.graph(requested + [cacert, iana])
            if fits(len(graph.paths)):
                corpus.append(("/".join(sorted(p.split("-", 1)[1] for p in requested)), graph))
        requestable = {r: frozenset(self.graph([r]).paths) for r in [*packages, cacert, iana]}
        return Corpus(name, corpus, popularity, frozenset((cacert, iana)), requestable)


def nixpkgs_like(seed: int, images: int = 24, chain: float = 0.6, sigma: float = 1.8) -> Corpus:
    """A package set of ~2000 paths and `images` images of 300+ paths each."""
    rng = random.Random(seed)
    u = _Universe(rng, sigma)
    glibc = u.add("glibc-2.38", 30 * MB, [])
    gcc = u.add("gcc-13.2.0-lib", 8 * MB, [glibc])
    core = [glibc, gcc]
    for i in range(14):
        core.append(u.add(f"corelib{i}-1.{i}", u.size(1 * MB), [glibc, *u.pick(core[1:], 2)]))

    # Generic libraries: preferential attachment to the core and each other.
    generic: list[str] = []
    weights: list[float] = []
    for i in range(700):
        refs = [glibc, *u.pick(core, rng.randint(1, 3))]
        refs += u.pick(generic, rng.randint(0, 4), weights or None)
        generic.append(u.add(f"lib{i}-{i % 7}.{i % 3}", u.size(200 * KB), refs))
        weights.append(1.0)
        for ref in refs:
            if ref in generic:
                weights[generic.index(ref)] += 1.0

    # Language ecosystems: an interpreter and packages on long chains.
    ecosystems: list[list[str]] = []
    for e, (lang, interp_size) in enumerate(
        [("python3", 90 * MB), ("perl", 50 * MB), ("ghc", 400 * MB), ("nodejs", 70 * MB)]
    ):
        interp = u.add(f"{lang}-{e + 3}.1", interp_size, [glibc, gcc, *core[2:8]])
        pkgs = [interp]
        for i in range(150):
            refs = [interp, *u.pick(generic, rng.randint(0, 3))]
            if rng.random() < chain:
                refs.append(pkgs[-1])  # the chain: each needs the one before
            refs += u.pick(pkgs, rng.randint(0, 3))
            pkgs.append(u.add(f"{lang}-pkg{i}-{i % 5}.0", u.size(200 * KB), refs))
        ecosystems.append(pkgs)

    shell = [u.add(n, u.size(2 * MB), [glibc, *u.pick(core, 2)]) for n in
             ("bash-interactive-5.2", "coreutils-9.4", "moreutils-0.67", "nano-7.2")]  # fmt: skip
    apps: list[str] = []
    for i in range(300):
        eco = ecosystems[i % len(ecosystems)]
        refs = [glibc, *u.pick(core, 3), *u.pick(generic, rng.randint(3, 25), weights)]
        refs += u.pick(eco[1:], rng.randint(2, 10))
        apps.append(u.add(f"app{i}-{i % 9}.{i % 4}", u.size(2 * MB), refs))
    app_weights = [1 / (i + 1) ** 0.8 for i in range(len(apps))]

    def draw() -> list[str]:
        return u.pick(apps, rng.randint(1, 3), app_weights) + (shell if rng.random() < 0.5 else [])

    return u.corpus(f"synthetic seed {seed}", images, draw, lambda n: n >= 300, [*apps, *shell])


def small_closures(seed: int, images: int = 24) -> Corpus:
    """A small package set (a C library, a few dozen libraries, tools on
    top) whose images have 5-40 store paths: every closure fits the default
    budget, as with an internal package set of a few services."""
    rng = random.Random(seed)
    u = _Universe(rng, sigma=1.5)
    glibc = u.add("glibc-2.38", 30 * MB, [])
    libs = [glibc]
    for i in range(40):
        libs.append(u.add(f"slib{i}-{i % 5}.1", u.size(1 * MB), [glibc, *u.pick(libs, 3)]))
    tools = [
        u.add(f"tool{i}-{i % 4}.2", u.size(3 * MB), [glibc, *u.pick(libs[1:], rng.randint(1, 6))])
        for i in range(60)
    ]
    weights = [1 / (i + 1) ** 0.8 for i in range(len(tools))]

    def draw() -> list[str]:
        return u.pick(tools, rng.randint(1, 3), weights)

    return u.corpus(f"small closures seed {seed}", images, draw, lambda n: 5 <= n <= 40, tools)
