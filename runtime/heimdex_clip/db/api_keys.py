"""Per-owner API keys for the search service: create (shown once), list, revoke, resolve.

A key is ``hck_`` + 43 characters of ``secrets.token_urlsafe(32)`` (256 random bits). Only
its SHA-256 is stored: a fast hash is enough for keys that random (there is no dictionary
to try), and it lets every request find its key with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import ConnectionPool

from .connection import DatabaseError
from .store import owner_uuid

KEY_PREFIX = "hck_"
_SHOWN_CHARS = 12  # "hck_" and 8 characters: enough to tell keys apart in a listing


@dataclass(frozen=True)
class ApiKey:
    """A stored key (never the key itself): its id, owner, visible prefix and state."""

    id: uuid.UUID
    owner_id: uuid.UUID
    key_prefix: str
    label: str | None
    created_at: datetime
    revoked_at: datetime | None


def key_hash(key: str) -> str:
    """The stored form of ``key``: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_like_key(token: str) -> bool:
    """True for a string shaped like one of our keys (not a JWT)."""
    return token.startswith(KEY_PREFIX)


def create_key(
    pool: ConnectionPool, owner_id: uuid.UUID | str, label: str | None = None
) -> tuple[str, ApiKey]:
    """A new key for ``owner_id``: (the key, to show once; its stored record)."""
    owner = owner_uuid(owner_id)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with pool.connection() as conn:
        row = conn.execute(
            "INSERT INTO heimdex_clip_api_keys (owner_id, key_sha256, key_prefix, label) "
            "VALUES (%s, %s, %s, %s) "
            "RETURNING id, owner_id, key_prefix, label, created_at, revoked_at",
            (owner, key_hash(key), key[:_SHOWN_CHARS], label),
        ).fetchone()
    if row is None:  # INSERT ... RETURNING always returns its row
        raise DatabaseError("creating the API key returned no row")
    return key, ApiKey(*row)


def list_keys(pool: ConnectionPool, owner_id: uuid.UUID | str | None = None) -> list[ApiKey]:
    """Every key (of one owner, if given), oldest first, revoked ones included."""
    where, params = ("WHERE owner_id = %s", (owner_uuid(owner_id),)) if owner_id else ("", ())
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, owner_id, key_prefix, label, created_at, revoked_at "
            f"FROM heimdex_clip_api_keys {where} ORDER BY created_at, id",
            params,
        ).fetchall()
    return [ApiKey(*row) for row in rows]


def revoke_key(pool: ConnectionPool, key_id: uuid.UUID | str) -> ApiKey:
    """Revoke a key by its id (from ``list``); it stops working at once. DatabaseError if
    there is no such key; revoking twice keeps the first revocation time."""
    with pool.connection() as conn:
        row = conn.execute(
            "UPDATE heimdex_clip_api_keys SET revoked_at = COALESCE(revoked_at, now()) "
            "WHERE id = %s RETURNING id, owner_id, key_prefix, label, created_at, revoked_at",
            (uuid.UUID(str(key_id)),),
        ).fetchone()
    if row is None:
        raise DatabaseError(f"no API key with id {key_id}")
    return ApiKey(*row)


def owner_of_key(pool: ConnectionPool, key: str) -> uuid.UUID | None:
    """The owner a live (not revoked) key belongs to, or None."""
    if not looks_like_key(key):
        return None
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT owner_id FROM heimdex_clip_api_keys "
            "WHERE key_sha256 = %s AND revoked_at IS NULL",
            (key_hash(key),),
        ).fetchone()
    return row[0] if row else None
