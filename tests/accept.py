"""Accept headers: the sets real clients send, and a generator of arbitrary ones."""

from __future__ import annotations

from hypothesis import strategies as st

from nixery.assembly.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Format

SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# The Accept header lines real clients send on a pull by tag, as recorded by a
# logging proxy; containers-image is skopeo 1.9, podman 4.3 and buildah 1.28.
CLIENT_ACCEPTS = {
    "containers-image": [
        OCI_MANIFEST, DOCKER_MANIFEST, SCHEMA1_SIGNED, SCHEMA1, DOCKER_LIST, OCI_INDEX,
    ],
    "containerd": [f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"],
    "oras-py": [f"{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}"],
    "python-dxf": [f"{SCHEMA1}, {DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}"],
    "docker-cli-28": [DOCKER_LIST, OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST],
    # Debian 12's docker.io: it names the OCI index but not the OCI manifest.
    "docker-cli-20.10": [DOCKER_LIST, OCI_INDEX, DOCKER_MANIFEST],
}  # fmt: skip
# What each client is answered: (single manifest, list) dialects.
CLIENT_DIALECTS = {client: (Format.OCI, Format.OCI) for client in CLIENT_ACCEPTS} | {
    "docker-cli-20.10": (Format.DOCKER, Format.DOCKER)
}


OURS = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
OTHERS = (SCHEMA1, SCHEMA1_SIGNED, "*/*", "application/*", "application/json", "text/html")
REFUSING = (";q=0", "; Q=0.000", ";q=0.0")
ACCEPTING = ("", ";q=1", "; q=0.5", ";q=0.001", ";level=1")


@st.composite
def accept_headers(draw: st.DrawFn) -> tuple[list[str], set[str]]:
    """Accept header lines over our types and others, and the set of types they name."""
    entries = draw(
        st.lists(
            st.tuples(
                st.sampled_from(OURS + OTHERS),
                st.sampled_from(ACCEPTING + REFUSING),
                st.booleans(),
            ),
            max_size=10,
        )
    )
    named = {media for media, params, _ in entries if params not in REFUSING}
    parts = [(media.upper() if upper else media) + params for media, params, upper in entries]
    cuts = sorted(draw(st.lists(st.integers(0, len(parts)), max_size=3)))
    lines = [", ".join(parts[a:b]) for a, b in zip([0, *cuts], [*cuts, len(parts)], strict=True)]
    return lines, named


def served_types(named: set[str]) -> set[str]:
    """What may be served to a client that named `named`: those types, or the
    default (a single OCI manifest) when it named none of our manifest types."""
    return named if named & {OCI_MANIFEST, DOCKER_MANIFEST} else {OCI_MANIFEST}
