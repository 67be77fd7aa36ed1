"""Database failures as one-line :class:`DatabaseError` messages that say what to do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import psycopg_pool

from ..errors import ClipError, DimensionError
from .connection import DatabaseError, one_line


class InvalidInputError(DatabaseError, ValueError):
    """A value the database cannot store or search with (out of range, NUL or a lone
    surrogate in a text, NaN in metadata), refused before it reaches SQL."""


class InvalidVectorError(InvalidInputError, DimensionError):
    """A vector of the wrong shape, with NaN/infinite elements, or whose norm is outside
    [MIN_NORM, MAX_NORM] (zero, denormal or huge: no cosine similarity)."""


class OutputError(ClipError, OSError):
    """A result file (``search --html``) cannot be written where asked; nothing was left."""


class LockedRowsError(DatabaseError):
    """Rows stayed locked by other sessions past every retry; nothing was changed."""


_RERUN = {
    "index": "everything stored so far is kept; re-running `heimdex-clip index` is safe "
    "(it updates scenes, never duplicates them)",
    "backfill": "finished scenes are kept and leased ones return to the queue when their "
    "lease expires; re-running `heimdex-clip backfill` is safe",
    "migrate": "each migration is applied whole or not at all; re-running "
    "`heimdex-clip db migrate` is safe",
}


@contextmanager
def refused_values() -> Iterator[None]:
    """Turn the database refusing a value (a CHECK, a trigger, a search function's argument
    check) into a one-line InvalidInputError/DatabaseError. Connection failures and timeouts
    pass through for the caller's retry or :func:`database_errors`."""
    try:
        yield
    except psycopg.DataError as exc:
        raise InvalidInputError(f"the database refused a value: {_first(exc)}") from None
    except psycopg.IntegrityError as exc:
        raise DatabaseError(f"the database refused the change: {_first(exc)}") from None


@contextmanager
def database_errors(command: str) -> Iterator[None]:
    """Turn psycopg/pool failures inside ``command`` into one-line DatabaseErrors."""
    after = _RERUN.get(command, f"re-running `heimdex-clip {command}` is safe")
    try:
        yield
    except (
        psycopg.errors.UndefinedTable,
        psycopg.errors.UndefinedFunction,
        psycopg.errors.UndefinedColumn,
    ) as exc:
        raise DatabaseError(
            f"the database schema is not up to date ({_first(exc)}): run `heimdex-clip db migrate`"
        ) from None
    except psycopg.errors.QueryCanceled as exc:
        raise DatabaseError(
            f"a statement ran past its time limit ({_first(exc)}; setting "
            f"HEIMDEX_DB_STATEMENT_TIMEOUT_MS); {after}"
        ) from None
    except psycopg.errors.LockNotAvailable as exc:
        raise DatabaseError(
            f"a lock was held by someone else for too long ({_first(exc)}; "
            f"setting HEIMDEX_DB_LOCK_TIMEOUT_MS); {after}"
        ) from None
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        raise DatabaseError(
            f"lost the database during {command} ({_first(exc)}); {after}"
        ) from None
    except psycopg.Error as exc:
        raise DatabaseError(f"the database refused {command}: {_first(exc)}") from None


def _first(exc: BaseException) -> str:
    return one_line(exc)
