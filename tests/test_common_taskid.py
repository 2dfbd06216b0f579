"""common/taskid.py: canonical task URLs, ids, redaction and id validators."""

from __future__ import annotations

import pytest

from common.taskid import filter_url, is_short_id, is_task_id, new_id, redact_url, task_id

NL_BUG = pytest.mark.regression  # was a bug, fixed
U = "http://origin.example/f.tar?Signature=abc&Expires=1&v=2"


@pytest.mark.parametrize("url,keys,want", [
    (U, ["Signature", "Expires"], "http://origin.example/f.tar?v=2"),
    (U, ["Signature"], "http://origin.example/f.tar?Expires=1&v=2"),
    (U, [], U),
    (U, ["signature"], U),  # keys are case-sensitive
    (U, ["Sig"], U),  # whole keys only
    ("http://h/p?a=1&b=&c=3", ["a"], "http://h/p?b=&c=3"),
    ("HTTP://User:Pw@HOST.Example:8080/P?x=1#frag", [], "http://host.example:8080/P?x=1"),
    ("http://h", [], "http://h/"),
    ("http://[::1]:81/a", [], "http://[::1]:81/a"),
])
def test_filter_url(url, keys, want) -> None:
    assert filter_url(url, keys) == want


def tid(url: str = U, **kw) -> str:
    return task_id(url, **kw)


def test_task_id_is_64_hex_and_stable() -> None:
    assert is_task_id(tid()) and tid() == tid()


@pytest.mark.parametrize("a,b", [
    (dict(url=U, filter_keys=["Signature", "Expires"]),
     dict(url="http://origin.example/f.tar?Signature=zzz&Expires=9&v=2",
          filter_keys=["Signature", "Expires"])),
    (dict(url="http://origin.example/f"), dict(url="http://user:secret@origin.example/f")),
    (dict(url="http://origin.example/f"), dict(url="HTTP://ORIGIN.EXAMPLE/f")),
    (dict(url="http://origin.example/f"), dict(url="http://origin.example/f#x")),
])
def test_same_task(a, b) -> None:
    assert task_id(**a) == task_id(**b)


@pytest.mark.parametrize("a,b", [
    (dict(url=U), dict(url=U, md5="0" * 32)),
    (dict(url=U, md5="0" * 32), dict(url=U, md5="1" * 32)),
    (dict(url=U), dict(url=U, identifier="v1")),
    (dict(url=U, identifier="v1"), dict(url=U, identifier="v2")),
    (dict(url=U), dict(url=U, range_header="bytes=0-9")),
    (dict(url=U, range_header="bytes=0-9"), dict(url=U, range_header="bytes=0-10")),
    (dict(url=U), dict(url=U, filter_keys=["Signature"])),
    (dict(url="http://h/a"), dict(url="http://h/b")),
    (dict(url="http://h/a"), dict(url="https://h/a")),
    (dict(url="http://h/a"), dict(url="http://h:81/a")),
    (dict(url="http://h/a?x=1"), dict(url="http://h/a?x=2")),
])
def test_different_task(a, b) -> None:
    assert task_id(**a) != task_id(**b)


@pytest.mark.parametrize("url,want", [
    ("http://u:p@h/x?q=1#f", "http://h/x?q=1#f"),
    ("http://u@h:81/x", "http://h:81/x"),
    ("http://:p@h/x", "http://h/x"),
    ("http://u:p@ss@h/x", "http://h/x"),
    ("http://h/x?user=a@b", "http://h/x?user=a@b"),
    ("https://h/x", "https://h/x"),
])
def test_redact_url(url, want) -> None:
    out = redact_url(url)
    assert out == want
    assert ":p@" not in out and "u:" not in out


def test_new_id() -> None:
    ids = {new_id() for _ in range(100)}
    assert len(ids) == 100 and all(is_short_id(i) for i in ids)


@pytest.mark.parametrize("value,task,short", [
    ("a" * 64, True, False), ("0123456789abcdef" * 4, True, False), ("a" * 32, False, True),
    ("A" * 64, False, False), ("A" * 32, False, False), ("a" * 63, False, False),
    ("a" * 65, False, False), ("g" * 64, False, False), ("", False, False),
    pytest.param("a" * 64 + "\n", False, False, marks=NL_BUG),
    pytest.param("a" * 32 + "\n", False, False, marks=NL_BUG),
    ("../" + "a" * 61, False, False), (" " + "a" * 32, False, False),
])
def test_id_validators(value, task, short) -> None:
    assert is_task_id(value) is task
    assert is_short_id(value) is short


def test_content_identifier_names_the_task_whatever_the_url() -> None:
    from common.taskid import is_content_identifier, task_key

    ident = "sha256:" + "ab" * 32
    a = task_id("http://r1:5000/v2/lib/a/blobs/" + ident, identifier=ident)
    b = task_id("https://r2/v2/other/blobs/" + ident + "?sig=1", identifier=ident)
    assert a == b and is_task_id(a)
    assert task_key("http://r1/x", (), ident) == task_key("http://r2/y", (), ident) == ident
    # anything that is not exactly a sha256 digest keeps the URL in the id
    for other in ("sha256:" + "AB" * 32, "sha256:" + "ab" * 31, "md5:" + "ab" * 16, "v1"):
        assert not is_content_identifier(other)
        assert task_id("http://r1/x", identifier=other) != task_id("http://r2/x", identifier=other)
        assert task_key("http://r1/x", (), other) == "http://r1/x"
    # md5 or a range keep the old derivation (a range of a blob is not the blob)
    assert task_id("http://r1/x", identifier=ident, range_header="bytes=0-1") != a
