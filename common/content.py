"""Content digests (`sha256:<64 lower-case hex>`) as task identities: parsing with a
precise refusal, the task id a digest names, and the import record's piece maths.

A digest task is the existing content-identifier task of common/taskid.py: its id comes
from the digest alone, so every URL (and an import) serving those bytes is one task.
No I/O here.
"""

from __future__ import annotations

import re

from .errors import Error
from .taskid import task_id

PREFIX = "sha256:"
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


class BadDigest(Error, ValueError):
    """A digest string we refuse; the message says what is wrong with it."""


def parse(text: str) -> str:
    """`sha256:<hex>` -> the canonical string (unchanged); BadDigest otherwise. Upper
    case is refused, not folded: two spellings of one digest must not be two task ids
    anywhere, and OCI digests are lower case by definition."""
    if not isinstance(text, str) or len(text) > 200:
        raise BadDigest("digest is too long")
    algo, sep, hexpart = text.partition(":")
    if not sep:
        raise BadDigest(f"digest must be sha256:<64 hex digits>, got {text[:80]!r}")
    if algo != "sha256":
        raise BadDigest(f"unsupported digest algorithm {algo[:20]!r} (only sha256)")
    if len(hexpart) != 64:
        raise BadDigest(f"a sha256 digest has 64 hex digits, got {len(hexpart)}")
    if not _HEX64.match(hexpart):
        raise BadDigest("digest must be 64 lower-case hex digits (0-9, a-f)")
    return text


def hex_of(digest: str) -> str:
    return parse(digest)[len(PREFIX):]


def task_id_of(digest: str) -> str:
    """The id of the task named by this digest (the same as `-i sha256:...` gives)."""
    return task_id("", identifier=parse(digest))
