"""metadata.json: per-version overrides of product fields (the seeds' fork format).

{"os": "Alpine", "release_title": "3.19 (stable)", "aliases": ["alp", "alpine/edge"],
 "requirements": {"secureboot": "false"}, "variant": "cloud",
 "release_codename": "...", "support_eol": "2026-12-31"}

Pure: parsing never raises; problems come back as one message so the caller can log one line.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~/:-]*$")
_STRING_FIELDS = ("os", "release_title", "variant", "release_codename", "support_eol")
KNOWN_FIELDS = frozenset(_STRING_FIELDS) | {"aliases", "requirements"}


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


def _aliases(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [a.strip() for a in value.split(",")]
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        items = [a.strip() for a in value]
    else:
        raise ValueError("'aliases' must be a list of strings or a comma-separated string")
    items = [a for a in items if a]
    for a in items:
        if not _ALIAS_RE.match(a):
            raise ValueError(f"alias {a!r} has characters aliases may not contain")
    return tuple(items)


def _requirements(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError("'requirements' must be an object of strings")
    out = []
    for k, v in value.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        if not isinstance(v, str):
            raise ValueError(f"requirements.{k} must be a string (or true/false)")
        out.append((str(k), v))
    return tuple(sorted(out))


def parse_overrides(data: bytes) -> tuple[Overrides, str | None]:
    """Bytes of a metadata.json -> (overrides, problem or None).

    Invalid JSON or a wrong type anywhere: (NO_OVERRIDES, why), so the version is still
    published with its defaults. Unknown keys are reported but do not void the file.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        return NO_OVERRIDES, f"invalid JSON ({e}); using defaults"
    if not isinstance(doc, dict):
        return NO_OVERRIDES, "top level must be a JSON object; using defaults"
    values: dict[str, Any] = {}
    try:
        for name in _STRING_FIELDS:
            if name in doc:
                if not isinstance(doc[name], str) or not doc[name].strip():
                    raise ValueError(f"{name!r} must be a non-empty string")
                values[name] = doc[name].strip()
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
    problem = f"ignoring unknown keys {', '.join(unknown)}" if unknown else None
    return Overrides(**values), problem
