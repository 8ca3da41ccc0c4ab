"""Shard lists and member names, the way the ``webdataset`` package reads them.

* `expand_urls`: ``"a::b"`` is two specs; ``${NAME}`` is replaced by the environment variable
  ``WDS_NAME`` (webdataset's ``envsubst``); then bash-style brace expansion as the ``braceexpand``
  package does it: ``{a,b,c}`` lists (nested, empty items allowed), ``{000..009}`` integer ranges
  (zero-padded to the wider bound when either bound has a leading zero; ``{1..10..3}`` steps;
  descending and negative ranges), ``{a..e}`` letter ranges, ``\\`` escapes.
* `split_member`: a tar member ``dir/abc.x.jpg`` is key ``dir/abc`` and extension ``x.jpg``
  (webdataset's ``base_plus_ext``: the key runs to the first dot of the basename).
* `is_meta_member`: members webdataset skips (``__name__`` at the top level, or anything matching
  ``__[^/]*__($|/)`` at the start).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

__all__ = ["expand_urls", "braceexpand", "split_member", "is_meta_member"]

_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ENV = re.compile(r"\$\{(\w+)\}")
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


def expand_urls(spec: str) -> list[str]:
    """Every shard URL or path that ``spec`` names, in order (see the module docstring)."""
    out: list[str] = []
    for part in spec.split("::"):
        for _ in range(10):  # webdataset substitutes up to ten times (a variable may name another)
            new = _ENV.sub(lambda m: os.environ.get("WDS_" + m.group(1), m.group(0)), part)
            if new == part:
                break
            part = new
        out.extend(braceexpand(part))
    return out


def braceexpand(pattern: str) -> list[str]:
    """Bash-style brace expansion (see the module docstring); unbalanced braces raise ValueError."""
    return [_unescape("".join(parts)) for parts in _pattern(pattern)]


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _pattern(pattern: str) -> Iterator[tuple[str, ...]]:
    """The pattern as a product of alternatives: literals and brace expressions in turn."""
    items: list[list[str]] = []
    start = pos = depth = 0
    while pos < len(pattern):
        ch = pattern[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == "{":
            if depth == 0 and pos > start:
                items.append([pattern[start:pos]])
                start = pos
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                inner = pattern[start + 1 : pos]
                alternatives = _expression(inner)
                if alternatives is None:  # braces around something that is not a list or range
                    items.extend([["{"], ["".join(p) for p in _pattern(inner)], ["}"]])
                else:
                    items.append(alternatives)
                start = pos + 1
        elif ch == "}":
            raise ValueError(f"unbalanced braces in {pattern!r}")
        pos += 1
    if depth:
        raise ValueError(f"unbalanced braces in {pattern!r}")
    if start < len(pattern):
        items.append([pattern[start:]])
    return _product(items)


def _product(items: list[list[str]]) -> Iterator[tuple[str, ...]]:
    if not items:
        yield ()
        return
    for head in items[0]:
        for rest in _product(items[1:]):
            yield (head, *rest)


def _expression(expr: str) -> list[str] | None:
    m = _INT_RANGE.match(expr)
    if m:
        return _int_range(*m.groups())
    m = _CHAR_RANGE.match(expr)
    if m:
        return _char_range(*m.groups())
    return _sequence(expr)


def _sequence(expr: str) -> list[str] | None:
    """``a,b{c,d},`` -> its comma-separated items (each expanded), or None without a top-level comma."""
    parts: list[str] = []
    start = pos = depth = 0
    while pos < len(expr):
        ch = expr[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth or not parts:
        return None
    parts.append(expr[start:])
    return ["".join(p) for part in parts for p in _pattern(part)]


def _int_range(first: str, last: str, step: str | None) -> list[str]:
    padded = any(s.startswith(("0", "-0")) for s in (first, last) if s not in ("0", "-0"))
    width = max(len(first), len(last)) if padded else 0
    inc = (int(step) or 1) if step else 1
    a, b = int(first), int(last)
    values = range(a, b + 1, inc) if a < b else range(a, b - 1, -inc)
    return [f"{v:0{width}d}" for v in values]


def _char_range(first: str, last: str, step: str | None) -> list[str]:
    inc = (int(step) or 1) if step else 1
    a, b = _LETTERS.index(first), _LETTERS.index(last)
    if a < b:
        return list(_LETTERS[a : b + 1 : inc])
    return list(_LETTERS[a : (b - 1 if b else None) : -inc])


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name, or None if it has no extension (webdataset skips it)."""
    m = _MEMBER.match(name)
    return (m.group(1), m.group(2)) if m else None


def is_meta_member(name: str) -> bool:
    """Whether webdataset skips this member as metadata."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return True
    return _META.match(name) is not None
