from __future__ import annotations

import string
from collections.abc import Callable
from itertools import groupby, product

import pytest

from nixery.errors import ErrorCode, RegistryError
from nixery.packages.names import (
    MAX_DIGEST_LENGTH,
    MAX_NAME_LENGTH,
    is_sha256,
    parse_image_name,
    validate_digest,
    validate_name,
    validate_tag,
)
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


# -- each grammar against an independent reading of the spec, exhaustively ------------------
#
# The oracles below are written from the OCI distribution spec's prose, one
# character class at a time, without regular expressions, so that a change
# in a grammar's regex shows up as a difference from them.

LOWER = set(string.ascii_lowercase)
DIGITS = set(string.digits)
HEX = set("0123456789abcdef")
# Every ASCII character and a few beyond (one- and two-byte, a lookalike digit).
CHARACTERS = [chr(c) for c in range(128)] + ["é", "ß", "١", "\u00a0", "Ａ"]


def spec_name_component(text: str) -> bool:
    """[a-z0-9]+ separated by one `.`, one `_`, two `__`, or any run of `-`."""
    alnum = LOWER | DIGITS
    if not text or not set(text) <= alnum | {".", "_", "-"}:
        return False
    if text[0] not in alnum or text[-1] not in alnum:
        return False
    separators = [
        "".join(g) for is_alnum, g in groupby(text, key=alnum.__contains__) if not is_alnum
    ]
    return all(s in {".", "_", "__"} or set(s) == {"-"} for s in separators)


def spec_name(text: str) -> bool:
    return len(text) <= MAX_NAME_LENGTH and all(map(spec_name_component, text.split("/")))


def spec_tag(text: str) -> bool:
    word = set(string.ascii_letters) | DIGITS | {"_"}
    return 1 <= len(text) <= 128 and text[0] in word and all(c in word | {".", "-"} for c in text)


def spec_digest(text: str) -> bool:
    algorithm, colon, encoded = text.partition(":")
    components = algorithm.replace("+", ".").replace("_", ".").replace("-", ".").split(".")
    algorithm_ok = all(c and all(ch in LOWER | DIGITS for ch in c) for c in components)
    encoded_ok = bool(encoded) and all(
        ch in set(string.ascii_letters) | DIGITS | {"=", "_", "-"} for ch in encoded
    )
    valid = bool(colon) and algorithm_ok and encoded_ok and len(text) <= MAX_DIGEST_LENGTH
    if valid and algorithm == "sha256":
        return len(encoded) == 64 and set(encoded) <= HEX
    return valid


def accepts(validate: Callable[[str], object], text: str) -> bool:
    try:
        validate(text)
    except RegistryError:
        return False
    return True


def strings(alphabet: str, max_length: int) -> list[str]:
    return ["".join(chars) for n in range(max_length + 1) for chars in product(alphabet, repeat=n)]


def test_name_grammar_is_exactly_the_spec() -> None:
    # Every character alone, inside a component and around a separator.
    for char in CHARACTERS:
        for text in (char, f"a{char}b", f"a/{char}", f"{char}/a", f"a{char}{char}b"):
            assert accepts(validate_name, text) == spec_name(text), repr(text)
    # Every string of up to five characters over the characters that matter.
    for text in strings("a9A._-/", 5):
        assert accepts(validate_name, text) == spec_name(text), repr(text)
    assert accepts(validate_name, "a" * MAX_NAME_LENGTH)
    assert not accepts(validate_name, "a" * (MAX_NAME_LENGTH + 1))


def test_tag_grammar_is_exactly_the_spec() -> None:
    for char in CHARACTERS:
        for text in (char, f"a{char}", f"{char}a", f"a{char}b"):
            assert accepts(validate_tag, text) == spec_tag(text), repr(text)
    for text in strings("aZ9._-:/", 3):
        assert accepts(validate_tag, text) == spec_tag(text), repr(text)
    assert accepts(validate_tag, "a" * 128) and not accepts(validate_tag, "a" * 129)


def test_digest_grammar_is_exactly_the_spec() -> None:
    for char in CHARACTERS:
        texts = [
            f"sha256:{char * 64}",
            f"sha256:{'a' * 63}{char}",
            f"sha256:{char}",
            f"sha512:{char}",
            f"{char}:abc",
            f"a{char}b:abc",
            f"a{char}{char}b:abc",
        ]
        for text in texts:
            assert accepts(validate_digest, text) == spec_digest(text), repr(text)
            if text.startswith("sha256:"):
                assert is_sha256(text) == spec_digest(text), repr(text)
    for text in strings("a1+._:A=", 4):
        assert accepts(validate_digest, text) == spec_digest(text), repr(text)
    for length in (63, 64, 65):
        for char in "0f9aAFg":
            text = "sha256:" + char * length
            assert accepts(validate_digest, text) == (length == 64 and char in HEX), text
            assert is_sha256(text) == (length == 64 and char in HEX), text
    assert accepts(validate_digest, "x:" + "a" * (MAX_DIGEST_LENGTH - 2))
    assert not accepts(validate_digest, "x:" + "a" * (MAX_DIGEST_LENGTH - 1))


def test_the_oracles_agree_with_the_spec_examples() -> None:
    """The oracles themselves, on examples taken from the spec's text."""
    assert spec_name("library/ubuntu") and spec_name("a__b/c-----d/e.f")
    assert not spec_name("a___b") and not spec_name("a._b") and not spec_name("A")
    assert spec_tag("v1.0_rc-2") and not spec_tag("-v1") and not spec_tag("")
    assert spec_digest("sha256:" + "0" * 64) and spec_digest("multihash+base58:QmRZxt2b1F")
    assert not spec_digest("sha256:" + "A" * 64) and not spec_digest("SHA256:abc")
