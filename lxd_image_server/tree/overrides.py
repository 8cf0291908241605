"""metadata.json: per-version overrides of product fields (the seeds' fork format).

{"os": "Alpine", "release_title": "3.19 (stable)", "aliases": ["alp", "alpine/edge"],
 "requirements": {"secureboot": "false"}, "variant": "cloud",
 "release_codename": "...", "support_eol": "2026-12-31"}

Pure: parsing never raises; problems come back as one message so the caller can log one line.
The file is an uploader's: its size, nesting, number of entries and the length of each string
are bounded, and no string may hold control characters.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from lxd_image_server.fsutil import load_json_bounded

#: A metadata.json is a few hundred bytes; larger ones are refused unread.
MAX_OVERRIDES_BYTES = 64 * 1024
#: {"requirements": {...}} and {"aliases": [...]} nest two levels.
MAX_DEPTH = 4
MAX_TEXT = 256
MAX_ALIASES = 32
MAX_REQUIREMENTS = 32

_ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~/:-]{0,127}", re.ASCII)
_REQUIREMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_STRING_FIELDS = ("os", "release_title", "variant", "release_codename", "support_eol")
KNOWN_FIELDS = frozenset(_STRING_FIELDS) | {"aliases", "requirements"}
#: Unicode categories never accepted in text: controls, format characters (zero-width and
#: direction marks), surrogates, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


@dataclass(frozen=True)
class Overrides:
    os: str | None = None
    release_title: str | None = None
    variant: str | None = None
    release_codename: str | None = None
    support_eol: str | None = None
    aliases: tuple[str, ...] = ()
    requirements: tuple[tuple[str, str], ...] = field(default=())

    @property
    def requirements_map(self) -> dict[str, str]:
        return dict(self.requirements)


NO_OVERRIDES = Overrides()


def _text(value: str, what: str) -> str:
    """`value` stripped, or ValueError when it is too long or holds control characters."""
    if len(value) > MAX_TEXT:
        raise ValueError(f"{what} is longer than {MAX_TEXT} characters")
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in value):
        raise ValueError(f"{what} holds control characters")
    return value.strip()


def _aliases(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [a.strip() for a in _text(value, "'aliases'").split(",")]
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        items = [_text(a, "an alias") for a in value]
    else:
        raise ValueError("'aliases' must be a list of strings or a comma-separated string")
    items = [a for a in items if a]
    if len(items) > MAX_ALIASES:
        raise ValueError(f"more than {MAX_ALIASES} aliases")
    for a in items:
        if not _ALIAS_RE.fullmatch(a):
            shown = a if len(a) <= MAX_TEXT else a[:MAX_TEXT] + "..."
            raise ValueError(
                f"alias {shown!r} is not an alias (at most 128 ASCII letters, digits, ._+~/:-)"
            )
    return tuple(items)


def _requirements(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError("'requirements' must be an object of strings")
    if len(value) > MAX_REQUIREMENTS:
        raise ValueError(f"more than {MAX_REQUIREMENTS} requirements")
    out = []
    for k, v in value.items():
        if not _REQUIREMENT_RE.fullmatch(k):
            raise ValueError(f"requirement name {k[:64]!r} is not a name (ASCII, at most 64)")
        if isinstance(v, bool):
            v = "true" if v else "false"
        if not isinstance(v, str):
            raise ValueError(f"requirements.{k} must be a string (or true/false)")
        out.append((k, _text(v, f"requirements.{k}")))
    return tuple(sorted(out))


def parse_overrides(data: bytes) -> tuple[Overrides, str | None]:
    """Bytes of a metadata.json -> (overrides, problem or None).

    Invalid JSON or a wrong type anywhere: (NO_OVERRIDES, why), so the version is still
    published with its defaults. Unknown keys are reported but do not void the file.
    """
    try:
        doc = load_json_bounded(data, MAX_OVERRIDES_BYTES, MAX_DEPTH)
    except ValueError as e:
        return NO_OVERRIDES, f"invalid JSON ({e}); using defaults"
    if not isinstance(doc, dict):
        return NO_OVERRIDES, "top level must be a JSON object; using defaults"
    values: dict[str, Any] = {}
    try:
        for name in _STRING_FIELDS:
            if name in doc:
                if not isinstance(doc[name], str) or not doc[name].strip():
                    raise ValueError(f"{name!r} must be a non-empty string")
                values[name] = _text(doc[name], repr(name))
        if "support_eol" in values:
            try:
                dt.date.fromisoformat(values["support_eol"])
            except ValueError:
                raise ValueError("'support_eol' must be a date YYYY-MM-DD") from None
        if "variant" in values and "/" in values["variant"]:
            raise ValueError("'variant' may not contain '/'")
        if "aliases" in doc:
            values["aliases"] = _aliases(doc["aliases"])
        if "requirements" in doc:
            values["requirements"] = _requirements(doc["requirements"])
    except ValueError as e:
        return NO_OVERRIDES, f"{e}; using defaults"
    unknown = sorted(set(doc) - KNOWN_FIELDS)
    shown = ", ".join(repr(k[:40]) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    problem = f"ignoring unknown keys {shown}" if unknown else None
    return Overrides(**values), problem
