"""``heimdex-clip db api-key create|list|revoke``: the search service's per-owner keys."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager

from psycopg_pool import ConnectionPool

from .api_keys import ApiKey, create_key, list_keys, revoke_key


def _row(key: ApiKey) -> dict[str, str | None]:
    return {
        "id": str(key.id),
        "owner_id": str(key.owner_id),
        "prefix": key.key_prefix,
        "label": key.label,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


def run(
    args: argparse.Namespace,
    db: Callable[[argparse.Namespace], AbstractContextManager[ConnectionPool]],
) -> int:
    """Run ``args.key_action`` against the pool ``db(args)`` opens."""
    with db(args) as pool:
        if args.key_action == "create":
            key, stored = create_key(pool, args.owner, args.label)
            print(key)  # the only time the key is shown: stdout, alone, for scripts
            print(
                f"created API key {stored.id} ({stored.key_prefix}...) for owner "
                f"{stored.owner_id}; store it now, it is not shown again",
                file=sys.stderr,
            )
        elif args.key_action == "list":
            keys = list_keys(pool, args.owner)
            if args.json:
                print(json.dumps([_row(k) for k in keys], indent=2))
            for k in [] if args.json else keys:
                state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
                print(f"{k.id}  {k.owner_id}  {k.key_prefix}...  {state}  {k.label or ''}")
        else:
            revoked = revoke_key(pool, args.key_id)
            print(
                f"revoked API key {revoked.id} ({revoked.key_prefix}...) of owner "
                f"{revoked.owner_id}"
            )
    return 0


def register(
    db_sub: argparse._SubParsersAction,
    common: argparse.ArgumentParser,
    func: Callable[[argparse.Namespace], int],
) -> None:
    """Add ``api-key`` (with create/list/revoke) under ``heimdex-clip db``."""
    keys = db_sub.add_parser("api-key", help="the search service's per-owner API keys")
    actions = keys.add_subparsers(dest="key_action", required=True)
    create = actions.add_parser("create", parents=[common], help="a new key, printed once")
    create.add_argument("--owner", type=uuid.UUID, required=True)
    create.add_argument("--label", default=None, help="a note to tell keys apart")
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="keys (never the keys themselves: their ids and first characters)",
    )
    listing.add_argument("--owner", type=uuid.UUID, default=None)
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("key_id", type=uuid.UUID)
    for parser in (keys, create, listing, revoke):
        parser.set_defaults(func=func)
