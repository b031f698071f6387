"""Docker's `filters` query parameter, shared by events, volumes, networks and the prunes:
JSON `{"name": {"web": true}}` (or the older `{"name": ["web"]}`), a key's values OR-ed,
the keys AND-ed."""

from __future__ import annotations

from typing import Any

from shoal_docker_gateway.errors import BadParameter

Filters = dict[str, list[str]]
MAX_VALUES = 256


def parse_filters(raw: Any, allowed: tuple[str, ...]) -> Filters:
    """The filters of a request (`raw` from query_json), each key in `allowed` else 400."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadParameter("invalid filters: expected a JSON object")
    out: Filters = {}
    for key, value in raw.items():
        if key not in allowed:
            raise BadParameter(f"invalid filter '{key}'")
        if isinstance(value, dict):
            values = [k for k, v in value.items() if v]
        elif isinstance(value, list):
            values = value
        else:
            raise BadParameter(f"invalid filter '{key}': expected an object or a list")
        if len(values) > MAX_VALUES or not all(isinstance(v, str) for v in values):
            raise BadParameter(f"invalid filter '{key}': expected up to {MAX_VALUES} strings")
        out[key] = list(values)
    return out


def labels_match(labels: dict[str, str], wanted: list[str]) -> bool:
    """Docker's `label` filter: every `KEY` present and every `KEY=VALUE` equal."""
    for item in wanted:
        key, sep, value = item.partition("=")
        if key not in labels or (sep and labels[key] != value):
            return False
    return True


def negated_labels_match(labels: dict[str, str], unwanted: list[str]) -> bool:
    """`label!`: none of the `KEY` / `KEY=VALUE` present."""
    for item in unwanted:
        key, sep, value = item.partition("=")
        if key in labels and (not sep or labels[key] == value):
            return False
    return True


def bool_filter(filters: Filters, key: str) -> bool | None:
    """A true/false filter (`dangling`): None when absent."""
    values = filters.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise BadParameter(f"invalid filter '{key}': one value only")
    low = values[0].lower()
    if low in ("1", "true"):
        return True
    if low in ("0", "false"):
        return False
    raise BadParameter(f"invalid filter '{key}={values[0]}'")
