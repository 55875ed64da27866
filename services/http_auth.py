"""Who is calling the HTTP front: the one function every request goes through.

Until API keys exist every caller is the default tenant and the header is not read;
keys and tenants plug in here, and the routes need not change.
"""

from __future__ import annotations

from twolane.services.jetstream import DEFAULT_TENANT


def authenticate(authorization: str | None) -> str:
    """The tenant of a request, from its `Authorization: Bearer <key>` header.

    Raises:
        UnauthenticatedError: the key is missing or unknown (once keys are checked).
    """
    return DEFAULT_TENANT
