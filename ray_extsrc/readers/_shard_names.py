"""Shard lists and member names, the way the ``webdataset`` package reads them.

* `expand_urls`: ``"a::b"`` is two specs; ``${NAME}`` is replaced by the environment variable
  ``WDS_NAME`` (webdataset's ``envsubst``); then bash-style brace expansion by the ``braceexpand``
  package, which webdataset uses too: ``{a,b,c}`` lists, ``{000..009}`` zero-padded integer ranges,
  ``{a..e}`` letter ranges, ``\\`` escapes; unbalanced braces raise ValueError.
* `split_member`: a tar member ``dir/abc.x.jpg`` is key ``dir/abc`` and extension ``x.jpg``
  (webdataset's ``base_plus_ext``: the key runs to the first dot of the basename).
* `is_meta_member`: members webdataset skips (``__name__`` at the top level, or anything matching
  ``__[^/]*__($|/)`` at the start).
"""

from __future__ import annotations

import os
import re

__all__ = ["expand_urls", "braceexpand", "split_member", "is_meta_member"]

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
    """Bash-style brace expansion (the ``braceexpand`` package's); unbalanced braces raise
    ValueError naming the pattern. Imported here, so that the readers load where only shard
    patterns need it (the GPU machine's bundle carries no braceexpand)."""
    from braceexpand import UnbalancedBracesError, braceexpand as expand

    try:
        return list(expand(pattern))
    except UnbalancedBracesError:
        raise ValueError(f"unbalanced braces in {pattern!r}") from None


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name, or None if it has no extension (webdataset skips it)."""
    m = _MEMBER.match(name)
    return (m.group(1), m.group(2)) if m else None


def is_meta_member(name: str) -> bool:
    """Whether webdataset skips this member as metadata."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return True
    return _META.match(name) is not None
