"""``?limit=N&before=<created_at>`` on the list routes: newest first, a page at a time."""

from __future__ import annotations

import math
from collections.abc import Mapping

from common.errors import InvalidRequest

# The end of year 9999: a cursor past it is not a creation time of this service.
LATEST_TIMESTAMP = 253402300799
MAX_PAGE = 100
# The same two query parameters, as the OpenAPI document describes them.
PAGE_PARAMETERS: tuple[dict[str, object], ...] = (
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 20}},
    {
        "name": "before",
        "in": "query",
        "schema": {"type": "number", "minimum": 0, "maximum": LATEST_TIMESTAMP},
        "description": "`next_before` of the previous page",
    },
)


def page_args(args: Mapping[str, str]) -> tuple[int, float | None]:
    """The page size (1 to 100, default 20) and the cursor: a 400 for anything else."""
    try:
        limit = int(args.get("limit", 20))
        before = float(args["before"]) if "before" in args else None
    except ValueError:
        raise InvalidRequest("limit must be an integer and before a timestamp") from None
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}")
    # float() also reads nan, inf and 1e999; Redis refuses them as a bound (a 503 otherwise).
    if before is not None and not (math.isfinite(before) and 0 <= before <= LATEST_TIMESTAMP):
        raise InvalidRequest(f"before must be a timestamp in seconds between 0 and {LATEST_TIMESTAMP}")
    return limit, before
