"""Who is calling: the owner comes from the credential, never from the request.

``Authorization: Bearer <credential>`` where the credential is either one of the owner's
API keys (``hck_...``, see :mod:`heimdex_clip.db.api_keys`) or an HS256 JWT signed with
CLIP_SERVE_JWT_SECRET whose ``sub`` is the owner's UUID and whose ``exp`` is required (for
an API server acting for its signed-in users). Anything else is a 401.
"""

from __future__ import annotations

import uuid

import jwt
from psycopg_pool import ConnectionPool

from ..db.api_keys import looks_like_key, owner_of_key
from .errors import ApiError, unauthorized

JWT_ALGORITHMS = ["HS256"]


def owner_from_jwt(token: str, secret: str | None) -> uuid.UUID:
    """The ``sub`` of a valid, unexpired HS256 JWT, as a UUID; ApiError 401 otherwise."""
    if not secret:
        raise unauthorized(
            "JWTs are not accepted by this service (CLIP_SERVE_JWT_SECRET is unset); use an API key"
        )
    try:
        claims = jwt.decode(
            token, secret, algorithms=JWT_ALGORITHMS, options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError:
        raise unauthorized("the token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise unauthorized(f"invalid token: {exc}") from None
    try:
        return uuid.UUID(str(claims["sub"]))
    except ValueError:
        raise unauthorized("invalid token: sub is not an owner UUID") from None


def authenticate(
    authorization: str | None, pool: ConnectionPool, jwt_secret: str | None
) -> uuid.UUID:
    """The owner named by an ``Authorization`` header's credential (blocking: may query
    the database); ApiError 401 if there is none or it is not valid."""
    if not authorization:
        raise unauthorized("missing credentials: send Authorization: Bearer <API key or JWT>")
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise unauthorized("the Authorization header must be: Bearer <API key or JWT>")
    if looks_like_key(credential):
        owner = owner_of_key(pool, credential)
        if owner is None:
            raise unauthorized("unknown or revoked API key")
        return owner
    return owner_from_jwt(credential, jwt_secret)


__all__ = ["ApiError", "authenticate", "owner_from_jwt"]
