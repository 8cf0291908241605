"""`[retention]`: how many versions of each product stay in the catalog. Pure: no file system.

    [retention]
    keep = 3                      # every product: the newest 3 (0, the default: all)
    [[retention.rule]]            # the first rule whose pattern matches a product decides
    match = "debian/*"            # os/release[/arch[/variant]], shell wildcards per component
    keep = 7                      # 0: every version of the matching products

A pattern is matched component by component (a `*` never crosses a `/`) against the product's
os, release, arch and variant; a pattern of two or three components matches any arch and
variant (or any variant). Names are case-sensitive, as in the tree.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

#: the layout's name characters plus the wildcards * ? [ ] !
_COMPONENT_RE = re.compile(r"[A-Za-z0-9._+~*?\[\]!-]{1,128}", re.ASCII)


class PolicyError(ValueError):
    """A pattern or count that cannot work; the message says why."""


def parse_pattern(text: str) -> tuple[str, ...]:
    """'os/release[/arch[/variant]]' -> its components. Raises PolicyError."""
    parts = tuple(text.split("/"))
    if not 2 <= len(parts) <= 4:
        raise PolicyError(
            f"pattern {text!r}: expected os/release, os/release/arch or os/release/arch/variant "
            "(wildcards * ? [...] within a component)"
        )
    for part in parts:
        if _COMPONENT_RE.fullmatch(part) is None:
            raise PolicyError(
                f"pattern {text!r}: component {part!r} may hold only letters, digits, "
                ". _ + ~ - and the wildcards * ? [...]"
            )
    return parts


@dataclass(frozen=True)
class KeepRule:
    pattern: str
    #: versions kept of each matching product; 0: all of them
    keep: int

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.keep < 0:
            raise PolicyError(f"pattern {self.pattern!r}: keep must not be negative")

    def matches(self, product: str) -> bool:
        """`product`: os:release:arch:variant, as in the catalog."""
        parts = product.split(":")
        pattern = parse_pattern(self.pattern)
        if len(parts) != 4:
            return False
        return all(fnmatch.fnmatchcase(p, g) for p, g in zip(parts, pattern, strict=False))


@dataclass(frozen=True)
class RetentionPolicy:
    #: versions kept of each product no rule matches; 0: all of them (retention off)
    keep: int = 0
    rules: tuple[KeepRule, ...] = ()

    def __post_init__(self) -> None:
        if self.keep < 0:
            raise PolicyError("keep must not be negative")

    @property
    def active(self) -> bool:
        return self.keep > 0 or any(r.keep > 0 for r in self.rules)

    def keep_for(self, product: str) -> int:
        """How many versions of `product` stay published; 0: all."""
        for rule in self.rules:
            if rule.matches(product):
                return rule.keep
        return self.keep
