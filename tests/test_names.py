from __future__ import annotations

import pytest

from nixery.errors import ErrorCode, RegistryError
from nixery.packages.names import parse_image_name, validate_digest, validate_tag
from nixery.packages.platforms import ARM64


def test_shell_expands_and_always_included_are_added() -> None:
    req = parse_image_name("shell/hello")
    assert req.packages == (
        "bashInteractive", "cacert", "coreutils", "hello", "iana-etc", "moreutils", "nano",
    )  # fmt: skip
    assert req.platform is None


def test_order_and_duplicates_do_not_matter() -> None:
    assert parse_image_name("curl/git") == parse_image_name("git/curl/git")


def test_arm64_selects_platform_and_is_no_package() -> None:
    req = parse_image_name("arm64/hello")
    assert req.platform == ARM64
    assert "arm64" not in req.packages


def test_digit_leading_names_get_an_underscore() -> None:
    assert "_1password" in parse_image_name("1password").packages
    assert "foo._7zip" in parse_image_name("foo.7zip").packages


def test_dotted_names_are_kept_for_nested_lookup() -> None:
    assert "haskellpackages.pandoc" in parse_image_name("haskellpackages.pandoc").packages


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Hello",
        "a//b",
        "/a",
        "a/",
        "-a",
        "a..b",
        "a/${x}",
        'a"b',
        "a b",
        "a/../b",
        "ä",
        "a" * 300,
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as err:
        parse_image_name(name)
    assert err.value.code is ErrorCode.NAME_INVALID


def test_too_many_packages() -> None:
    with pytest.raises(RegistryError) as err:
        parse_image_name("/".join(f"p{i}" for i in range(5)), max_packages=4)
    assert err.value.code is ErrorCode.NAME_INVALID


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a/b", "a:b", "a b"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(RegistryError) as err:
        validate_tag(tag)
    assert err.value.code is ErrorCode.TAG_INVALID


@pytest.mark.parametrize(
    "digest", ["sha256:abc", "sha256:" + "G" * 64, "nocolon", "sha256:", ":" + "a" * 64]
)
def test_invalid_digests(digest: str) -> None:
    with pytest.raises(RegistryError) as err:
        validate_digest(digest)
    assert err.value.code is ErrorCode.DIGEST_INVALID


def test_valid_digest() -> None:
    validate_digest("sha256:" + "a" * 64)
    validate_digest("sha512:" + "b" * 128)
