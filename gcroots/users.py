"""User names for messages.  Standard library only."""

from __future__ import annotations

import pwd


def user_name(uid: int) -> str:
    """`alice`, or `uid 1234` for a uid without an account."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
