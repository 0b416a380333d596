"""Property tests of the name, tag, digest and git ref validators."""

from __future__ import annotations

import re
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery.errors import ErrorCode, RegistryError
from nixery.packages.names import (
    ALWAYS_INCLUDED,
    MAX_NAME_LENGTH,
    NAME_RE,
    SHELL_PACKAGES,
    is_safe_git_ref,
    parse_image_name,
    validate_digest,
    validate_git_ref,
    validate_tag,
)

FIXED = {*ALWAYS_INCLUDED, *SHELL_PACKAGES}
ATTRIBUTE = re.compile(r"_?[a-z0-9]+(?:(?:\.|_|__|-+)_?[a-z0-9]+)*")

alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
separator = st.sampled_from([".", "_", "__", "-", "---"])
component = st.tuples(st.lists(alnum, min_size=1, max_size=3), separator).map(
    lambda t: t[1].join(t[0])
)
valid_names = st.lists(component, min_size=1, max_size=10).map("/".join)


@given(st.text(max_size=300))
def test_any_text_is_parsed_or_refused_with_name_invalid(name: str) -> None:
    try:
        request = parse_image_name(name)
    except RegistryError as exc:
        assert exc.code is ErrorCode.NAME_INVALID and exc.code.status == 400
        return
    assert NAME_RE.fullmatch(name) and len(name) <= MAX_NAME_LENGTH
    for package in request.packages:
        assert package in FIXED or ATTRIBUTE.fullmatch(package), package


@given(valid_names)
def test_valid_names_give_attribute_names(name: str) -> None:
    request = parse_image_name(name)
    for package in request.packages:
        assert package in FIXED or ATTRIBUTE.fullmatch(package), package


@given(st.lists(alnum, min_size=2, max_size=80))
def test_package_count_limit(parts: list[str]) -> None:
    name = "/".join(parts)
    if len(name) > MAX_NAME_LENGTH:
        return
    limit = 10
    if len(parts) > limit:
        with pytest.raises(RegistryError) as err:
            parse_image_name(name, max_packages=limit)
        assert err.value.code is ErrorCode.NAME_INVALID
    else:
        parse_image_name(name, max_packages=limit)


@given(st.text(max_size=200))
def test_tags_and_digests_refuse_with_400(text: str) -> None:
    for validate, code in ((validate_tag, "TAG_INVALID"), (validate_digest, "DIGEST_INVALID")):
        try:
            validate(text)
        except RegistryError as exc:
            assert exc.code.name == code and exc.code.status == 400
            continue
        assert text.isascii() and not text.startswith(("-", ".")) and len(text) <= 256


@pytest.mark.parametrize(
    "ref",
    ["--upload-pack=touch /tmp/x", "-c", "-", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*",
     "a[", "a\\b", "/a", "a/", "a.", "a.lock", "a/.b", "@", "a@{1}", "a//b", "", "a\x00",
     "a\x7f", "\u00e4", "x" * 256],
)  # fmt: skip
def test_unsafe_git_refs(ref: str) -> None:
    assert not is_safe_git_ref(ref)
    with pytest.raises(RegistryError) as err:
        validate_git_ref(ref)
    assert err.value.code is ErrorCode.TAG_INVALID


@pytest.mark.parametrize(
    "ref", ["main", "nixos-23.11", "release/1.0", "v1.2.3", "a" * 40, "0123abcd" * 5, "_x"]
)
def test_safe_git_refs(ref: str) -> None:
    assert validate_git_ref(ref) == ref


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=60), st.text(st.characters(min_codepoint=33, max_codepoint=126))))
def test_safe_git_refs_are_what_git_accepts(ref: str) -> None:
    """Never looser than `git check-ref-format` (and never option-like)."""
    if not is_safe_git_ref(ref):
        return
    assert not ref.startswith("-")
    result = subprocess.run(
        ["git", "check-ref-format", "--allow-onelevel", ref], capture_output=True, check=False
    )
    assert result.returncode == 0, ref
