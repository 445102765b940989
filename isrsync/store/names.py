"""The names and ids every Store accepts: user names, parcel names, parcel ids.

They are part of the Store contract, so the home server and the in-memory store
refuse the same names with the same words.
"""

from __future__ import annotations

import re
import uuid

from ..errors import UsageError

USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,63}$")
PARCEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_user_name(name: str) -> str:
    if not USER_RE.fullmatch(name):
        raise UsageError(
            f"{name[:80]!r} is not a valid user name",
            hint="use lower-case letters, digits, '_', '.', '-' (at most 64)",
        )
    return name


def check_parcel_name(name: str) -> str:
    if not PARCEL_NAME_RE.fullmatch(name):
        raise UsageError(
            f"{name[:80]!r} is not a valid parcel name",
            hint="use letters, digits, '_', '.', '-' (at most 128), not starting with a symbol",
        )
    return name


def parse_parcel_id(ref: str | uuid.UUID) -> uuid.UUID | None:
    if isinstance(ref, uuid.UUID):
        return ref
    try:
        return uuid.UUID(ref)
    except (ValueError, AttributeError):
        return None
