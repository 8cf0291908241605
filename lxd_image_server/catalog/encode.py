"""The catalog's JSON, byte for byte what `json.dumps(doc, sort_keys=True, indent=1,
ensure_ascii=False)` writes, made fast enough for 20,000 versions.

Python's json module encodes indented documents with its pure-Python encoder, one generator
step per token: at 20,000 versions that is most of a publish. Here each flat mapping (an item:
strings and numbers) is joined from the C-accelerated string escaper in one go, and a mapping
marked `Encoded` keeps its text, so the next publish reuses it: the watcher re-encodes only the
versions that changed. A text encoded at level 0 is valid at any level once each of its line
breaks is followed by that level's indentation (JSON strings hold no raw line break).

Only what the catalog holds is accepted (str keys; dict, list, tuple, str, int, bool, None);
anything else is a TypeError, never a silently different encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from json.encoder import encode_basestring
from typing import Any

#: indentation per nesting level (json.dumps' indent=1)
_INDENT = " "


class Encoded(dict[str, Any]):
    """A dict whose encoding is kept once computed (for the nesting level it was last encoded
    at). Treat it as frozen once encoded: a change after that is not seen by the encoder."""

    __slots__ = ("cached",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cached: tuple[int, bytes] | None = None


def _scalar(value: object) -> str | None:
    """The encoding of a scalar, or None for a container."""
    if isinstance(value, str):
        return encode_basestring(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if type(value) is int:
        return int.__repr__(value)
    if isinstance(value, (dict, list, tuple)):
        return None
    raise TypeError(f"the catalog holds no {type(value).__name__}")


Parts = list[str | bytes]


def _utf8(parts: Parts) -> bytes:
    return b"".join([p.encode() if isinstance(p, str) else p for p in parts])


def _parts(value: Any, level: int, out: Parts) -> None:
    scalar = _scalar(value)
    if scalar is not None:
        out.append(scalar)
        return
    if isinstance(value, Encoded):
        if value.cached is None or value.cached[0] != level:
            own: Parts = []
            _container(value, level, own)
            value.cached = (level, _utf8(own))
        out.append(value.cached[1])
        return
    _container(value, level, out)


def _container(value: Any, level: int, out: Parts) -> None:
    inner = "\n" + _INDENT * (level + 1)
    if isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        keys = sorted(value)
        for k in keys:
            if not isinstance(k, str):
                raise TypeError("the catalog's keys are strings")
        flat = [_scalar(value[k]) for k in keys] if len(keys) <= 16 else None
        if flat is not None and None not in flat:
            body = ("," + inner).join(
                f"{encode_basestring(k)}: {v}" for k, v in zip(keys, flat, strict=True)
            )
            out.append("{" + inner + body + "\n" + _INDENT * level + "}")
            return
        out.append("{")
        first = True
        for k in keys:
            out.append(inner if first else "," + inner)
            first = False
            out.append(encode_basestring(k) + ": ")
            _parts(value[k], level + 1, out)
        out.append("\n" + _INDENT * level + "}")
        return
    seq: Sequence[Any] = value
    if not seq:
        out.append("[]")
        return
    out.append("[")
    for i, item in enumerate(seq):
        out.append(inner if i == 0 else "," + inner)
        _parts(item, level + 1, out)
    out.append("\n" + _INDENT * level + "]")


def encode_utf8(value: Any) -> bytes:
    """`json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False).encode()`, reusing
    the text of every `Encoded` mapping inside (kept as UTF-8: joined without a copy as str)."""
    out: Parts = []
    _parts(value, 0, out)
    return _utf8(out)


def encode(value: Any) -> str:
    """`json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False)` (see encode_utf8)."""
    return encode_utf8(value).decode()
