"""The one encoder of the catalog: the typed model (model.py) -> the bytes of images.json and
index.json.

The layout is `json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False)` and a line break,
byte for byte (tests/unit/test_golden.py pins it), made fast enough for 20,000 versions.
Python's json module encodes indented documents with its pure-Python encoder, one generator
step per token: at 20,000 versions that is most of a publish. Here each flat mapping (an item:
strings and numbers) is joined from the C-accelerated string escaper in one go, and each
Version's entry is encoded once and kept with it (`model.Version.derived`: a version is never
changed once built), so the next publish reuses it: the watcher encodes only the versions that
changed. A version's entry always sits at the same depth (VERSION_LEVEL), so its text holds.

The document is handed on in pieces (`encode_pieces`, `dated_catalog`: gzip_chunks.Pieces):
each kept entry by reference, the text between two entries as one piece, and where each
version's line starts (gzip_chunks cuts there). A publish never joins them: images.json is
written from them and its .gz compressed from them a chunk at a time, so no copy of the 20 MB
of a catalog of 20,000 versions is made (issue 22: the watcher's peak memory).

A layout without indentation (`separators=(",", ":")`) was measured at 20,000 versions: 18 %
fewer bytes, but a .gz only 1.3 % smaller and gzip no faster (clients that can take the .gz
get it); not worth a new format for the clients' caches, the mirrors and gzip_chunks.py's
version-line cuts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any

from lxd_image_server.catalog.gzip_chunks import Pieces, Place
from lxd_image_server.catalog.model import COMBINED_ATTRS, Catalog, Index, Item, Product, Version

#: indentation per nesting level (json.dumps' indent=1)
_INDENT = " "
#: a version's entry in images.json: document -> products -> <product> -> versions -> <serial>
VERSION_LEVEL = 4
#: a line break and the indentation of each level an item's text may be at
_INNER = tuple("\n" + _INDENT * level for level in range(VERSION_LEVEL + 4))


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
    if isinstance(value, (dict, list, tuple, Version)):
        return None
    raise TypeError(f"the catalog holds no {type(value).__name__}")


class _Out:
    """The encoder's output: text (`append`), and each version's kept entry as a piece of its
    own (`entry`), never copied; the text between two entries becomes one piece."""

    __slots__ = ("_text", "append", "lines", "pieces")

    def __init__(self) -> None:
        self._text: list[str] = []
        self.append = self._text.append
        self.pieces: list[bytes] = []
        #: where each version's line starts (gzip_chunks.Pieces)
        self.lines: list[Place] = []

    def _flush(self) -> bytes:
        text = "".join(self._text).encode()
        self._text.clear()
        return text

    def entry(self, entry: bytes, line: str = "", key: str = "") -> None:
        """A version's entry; `line`, `key`: the line break and indentation opening its line,
        and its key (encoded), when it is the value of a key."""
        head = self._flush()
        if line and '"' not in key[1:-1]:  # (gzip_chunks.VERSION_LINE finds it there)
            self.lines.append((len(self.pieces), len(head)))
            head += (line + key + ": ").encode()
        self.pieces.append(head)
        self.pieces.append(entry)

    def done(self) -> Pieces:
        self.pieces.append(self._flush())
        return Pieces(self.pieces, self.lines)


#: an item's fields by their JSON names, sorted (sort_keys): JSON name -> attribute of Item
_ITEM_FIELDS = sorted(
    [
        *COMBINED_ATTRS.items(),
        *((n, n) for n in ("combined_type", "delta_base", "ftype", "path", "sha256", "size")),
    ]
)


#: (`"name": `, attribute) of each field of an item, in _ITEM_FIELDS' order
_ITEM_KEYS = tuple((f'"{name}": ', attr) for name, attr in _ITEM_FIELDS)


def _item_text(item: Item, level: int) -> str:
    # (60,000 items at 20,000 versions: a string is escaped here directly, the rest by
    # _scalar, which refuses what the catalog does not hold)
    fields = []
    for key, attr in _ITEM_KEYS:
        value = getattr(item, attr)
        if value is not None:
            text = encode_basestring(value) if type(value) is str else _scalar(value)
            if text is None:
                raise TypeError(f"an item's {key[:-2]} holds a container")
            fields.append(key + text)
    inner = _INNER[level + 1]
    return "{" + inner + ("," + inner).join(fields) + _INNER[level] + "}"


def _version_text(version: Version) -> bytes:
    """A version's entry at VERSION_LEVEL: {"items": {key: item, ...}}, from its fields."""
    if not version.items:
        items = "{}"
    else:
        inner = "\n" + _INDENT * (VERSION_LEVEL + 2)
        items = (
            "{"
            + inner
            + ("," + inner).join(
                f"{encode_basestring(k)}: {_item_text(version.items[k], VERSION_LEVEL + 2)}"
                for k in sorted(version.items)
            )
            + "\n"
            + _INDENT * (VERSION_LEVEL + 1)
            + "}"
        )
    outer = "\n" + _INDENT * (VERSION_LEVEL + 1)
    return ("{" + outer + '"items": ' + items + "\n" + _INDENT * VERSION_LEVEL + "}").encode()


def _parts(value: Any, level: int, out: _Out) -> None:
    if type(value) is Version:  # (first: 20,000 of them in a catalog)
        if level == VERSION_LEVEL:
            out.entry(value.derived("entry", _version_text))
        else:
            _container(value.to_json(), level, out)
        return
    scalar = _scalar(value)
    if scalar is not None:
        out.append(scalar)
    else:
        _container(value, level, out)


def _container(value: Any, level: int, out: _Out) -> None:
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
        entries = level + 1 == VERSION_LEVEL
        for k in keys:
            v = value[k]
            if not first:
                out.append(",")
            first = False
            if entries and type(v) is Version:
                out.entry(v.derived("entry", _version_text), inner, encode_basestring(k))
                continue
            out.append(inner)
            out.append(encode_basestring(k) + ": ")
            _parts(v, level + 1, out)
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


def encode_value(value: Any) -> bytes:
    """`json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False).encode()` of a JSON
    value (str keys; dict, list, tuple, str, int, bool, None; a model.Version as its entry);
    anything else is a TypeError, never a silently different encoding."""
    return encode_pieces(value).join()


def encode_pieces(value: Any) -> Pieces:
    """encode_value's bytes in pieces: each version's kept entry not copied."""
    out = _Out()
    _parts(value, 0, out)
    return out.done()


def _products_doc(products: Mapping[str, Product]) -> dict[str, Any]:
    # (each version stays a Version: its kept text is reused)
    return {k: {**p.fields(), "versions": dict(p.versions)} for k, p in products.items()}


def _catalog_doc(catalog: Catalog, updated: str) -> dict[str, Any]:
    return {
        "content_id": catalog.content_id,
        "datatype": catalog.datatype,
        "format": catalog.format,
        "products": _products_doc(catalog.products),
        "updated": updated,
    }


def catalog_bytes(catalog: Catalog) -> bytes:
    """images.json's bytes."""
    return encode_value(_catalog_doc(catalog, catalog.updated)) + b"\n"


def dated_catalog(catalog: Catalog) -> Callable[[str], Pieces]:
    """catalog_bytes(catalog) for any value of its `updated` (the last key), in pieces: the
    rest is encoded once, as the bytes are the same up to that last line, and never joined
    (each version's kept entry is one of the pieces: publish.py writes them as they are)."""
    doc = encode_pieces(_catalog_doc(catalog, ""))
    parts = list(doc.parts)
    last = bytes(parts.pop())  # (the text after the last entry: a few lines)
    tail = b' "updated": ""\n}'
    if not last.endswith(tail):
        raise AssertionError("`updated` is not the document's last key")
    head = last[: -len(tail)]

    def dated(updated: str) -> Pieces:
        last = head + b' "updated": ' + encode_value(updated) + b"\n}\n"
        return Pieces([*parts, last], doc.lines)

    return dated


def index_bytes(index: Index) -> bytes:
    """index.json's bytes."""
    return encode_value(index.to_json()) + b"\n"
