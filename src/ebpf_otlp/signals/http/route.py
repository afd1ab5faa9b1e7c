"""Low-cardinality routes from request paths.

A path segment that looks like an identifier (a number, a UUID, a long hex
string, or anything matching a user's pattern) becomes ``*``:
``/users/123/orders/9f86d081884c7d65`` -> ``/users/*/orders/*``.
"""

from __future__ import annotations

import re
from typing import Iterable

DEFAULT_ID_PATTERNS = (
    r"\d+",
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    r"(?=[^/]*\d)[0-9a-fA-F]{8,}",  # hex ids with at least one digit (not "deadbeef"-words)
    r"[^/]{41,}",  # very long segments (tokens, hashes in other encodings)
)


class RouteTemplater:
    """Maps paths to templates, with a bounded cache."""

    def __init__(self, extra_patterns: Iterable[str] = (), cache_size: int = 65536):
        pats = list(DEFAULT_ID_PATTERNS) + list(extra_patterns)
        self._id = re.compile("|".join(f"(?:{p})" for p in pats))
        self._cache: dict[str, str] = {}
        self.cache_size = cache_size

    def __call__(self, path: str) -> str:
        r = self._cache.get(path)
        if r is None:
            full = self._id.fullmatch
            r = "/".join("*" if seg and full(seg) else seg for seg in path.split("/")) or "/"
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[path] = r
        return r
