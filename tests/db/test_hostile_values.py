"""Values the database cannot compare or hold: refused by the store with one-line typed
errors, and by SQL itself (a writer bypassing the package cannot poison search)."""

from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import psycopg
import pytest

from heimdex_clip import DimensionError
from heimdex_clip.db.backfill import Scope
from heimdex_clip.db.connection import DatabaseError, open_pool, start_embedded
from heimdex_clip.db.errors import InvalidInputError, InvalidVectorError, OutputError
from heimdex_clip.db.migrate import MIGRATIONS_DIR, migrate
from heimdex_clip.db.report import write_page
from heimdex_clip.db.stats import clip_stats
from heimdex_clip.db.store import SceneStore, write_vector

from .test_cli_errors import one_line_error

pytestmark = pytest.mark.db
A = "ViT-B-32:none:aaaaaaaaaaaaaaaa"


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(512)
    return (v / np.linalg.norm(v)).astype(np.float32)


# Each has no usable cosine: zero, denormal, merely tiny, overflowing float32 sums, NaN, inf.
NO_COSINE = {
    "zero": np.zeros(512, np.float32),
    "denormal": np.full(512, 1e-40, np.float32),
    "tiny": _unit(0) * np.float32(1e-8),
    "huge": _unit(0) * np.float32(1e7),
    "nan": np.where(np.arange(512) == 3, np.nan, _unit(0)).astype(np.float32),
    "inf": np.where(np.arange(512) == 3, np.inf, _unit(0)).astype(np.float32),
}


def _literal(v: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


def _count(pool) -> int:
    with pool.connection() as conn:
        return conn.execute(
            "SELECT count(*) FROM scenes WHERE embedding_visual_clip IS NOT "
            "NULL OR visual_clip_metadata IS NOT NULL"
        ).fetchone()[0]


@pytest.mark.parametrize("kind", NO_COSINE)
def test_the_store_refuses_vectors_without_a_cosine(pool, kind):
    store, owner, bad = SceneStore(pool), uuid.uuid4(), NO_COSINE[kind]
    scene = store.add_scene(owner, "a.jpg")
    for call in (
        lambda: store.save_embedding(scene, owner, bad, {}, artifact=A),
        lambda: store.upsert_scene(owner, "b.jpg", bad, {}, artifact=A),
        lambda: store.search_by_embedding(owner, bad, artifact=A),
    ):
        with pytest.raises(InvalidVectorError) as info:
            call()
        assert isinstance(info.value, DimensionError) and "\n" not in str(info.value)
    assert _count(pool) == 0


def test_sql_refuses_them_too(pool):
    owner = uuid.uuid4()
    with pool.connection() as conn:
        scene = conn.execute(
            "INSERT INTO scenes (owner_id, frame_path, embedding_visual_clip, "
            "visual_clip_artifact) VALUES (%s, 'ok.jpg', %s, %s) RETURNING id",
            (owner, _unit(1), A),
        ).fetchone()[0]
        conn.commit()
        for kind in ("zero", "denormal", "tiny", "huge"):
            literal = _literal(NO_COSINE[kind])
            for column in ("embedding_visual_clip", "embedding_visual_clip_alt"):
                with pytest.raises(psycopg.errors.CheckViolation, match="comparable"):
                    conn.execute(
                        f"UPDATE scenes SET {column} = %s::vector WHERE id = %s", (literal, scene)
                    )
                conn.rollback()
            for search in (
                "search_scenes_by_visual_clip_embedding(%s::vector, 0, 5, %s, %s)",
                "search_scenes_by_visual_clip_embedding(%s::vector, 0, 5, %s)",
            ):
                args = (literal, owner, A) if search.count("%s") == 3 else (literal, owner)
                with pytest.raises(psycopg.errors.InvalidParameterValue, match="has norm"):
                    conn.execute(f"SELECT * FROM {search}", args)
                conn.rollback()
        for literal in ("[NaN" + ",0" * 511 + "]", "[Infinity" + ",0" * 511 + "]"):
            with pytest.raises(psycopg.errors.DataException):  # pgvector's own refusal
                conn.execute(
                    "SELECT * FROM search_scenes_by_visual_clip_embedding"
                    "(%s::vector, 0, 5, %s, %s)",
                    (literal, owner, A),
                )
            conn.rollback()


def test_a_zero_vector_stored_anyway_never_passes_a_threshold(pool):
    """Even with the constraint dropped (a row from before it, or a hostile superuser), a
    NaN similarity is never returned, and such a row as a query is refused."""
    owner, store = uuid.uuid4(), SceneStore(pool)
    good = store.upsert_scene(owner, "good.jpg", _unit(2), {}, artifact=A)
    with pool.connection() as conn:
        conn.execute("ALTER TABLE scenes DROP CONSTRAINT scenes_visual_clip_vectors_comparable")
        zero = conn.execute(
            "INSERT INTO scenes (owner_id, frame_path, embedding_visual_clip, "
            "visual_clip_artifact, visual_clip_metadata) VALUES (%s, 'z.jpg', "
            "%s::vector, %s, '{}') RETURNING id",
            (owner, _literal(NO_COSINE["zero"]), A),
        ).fetchone()[0]
        conn.commit()
    for threshold in (-1, 0.5, 0.999):
        hits = store.search_by_embedding(owner, _unit(2), artifact=A, threshold=threshold)
        assert [h.id for h in hits] == [good]
        assert all(np.isfinite(h.similarity) for h in hits)
    with pytest.raises(InvalidInputError, match="has norm 0"):
        store.search_similar(owner, zero, artifact=A)


def test_migration_007_removes_bad_vectors_for_re_embedding(db_url, tmp_path):
    before = tmp_path / "migrations"
    before.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("00[1-6]_*.sql")):
        shutil.copy(path, before)
    pool = open_pool(db_url)
    try:
        migrate(pool, before)
        owner, rows = uuid.uuid4(), {}
        with pool.connection() as conn:
            for name, main, alt in (
                ("good", _unit(3), _unit(4)),
                ("zero-main", NO_COSINE["zero"], None),
                ("huge-alt", _unit(5), NO_COSINE["huge"]),
            ):
                rows[name] = conn.execute(
                    """INSERT INTO scenes (owner_id, frame_path, embedding_visual_clip,
                           visual_clip_artifact, visual_clip_metadata, embedding_visual_clip_alt,
                           visual_clip_alt_artifact, visual_clip_job_artifact,
                           visual_clip_attempts)
                       VALUES (%s, %s, %s::vector, %s, '{"inference_time_ms": 3}', %s::vector,
                               %s, %s, 3) RETURNING id""",
                    (
                        owner,
                        name,
                        _literal(main),
                        A,
                        _literal(alt) if alt is not None else None,
                        "B" if alt is not None else None,
                        A,
                    ),
                ).fetchone()[0]
            conn.commit()
        assert migrate(pool)[0] == "007_hardening.sql"  # then the later migrations
        store = SceneStore(pool)
        good, zero, huge = (
            store.get_scene(owner, rows[k]) for k in ("good", "zero-main", "huge-alt")
        )
        assert good["embedding_visual_clip"] is not None and good["visual_clip_alt_artifact"]
        assert zero["embedding_visual_clip"] is None and zero["visual_clip_attempts"] == 0
        assert "migration 007" in zero["visual_clip_metadata"]["error"]
        assert zero["visual_clip_artifact"] == A  # the slot is A's, waiting for a vector
        assert huge["embedding_visual_clip"] is not None
        assert (
            huge["embedding_visual_clip_alt"] is None
            and huge["visual_clip_alt_artifact"] is None
            and "second slot" in huge["visual_clip_last_error"]
        )
        with pool.connection() as conn:  # every row satisfies the constraint
            conn.execute(
                "ALTER TABLE scenes VALIDATE CONSTRAINT scenes_visual_clip_vectors_comparable"
            )
    finally:
        pool.close()


BAD_TEXT = {"nul": "a\x00b.jpg", "surrogate": "caf\udce9.jpg"}


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda s, o: s.search_by_embedding(o, _unit(0), artifact=A, count=2**31), "count"),
        (lambda s, o: s.search_by_embedding(o, _unit(0), artifact=A, count=True), "count"),
        (lambda s, o: s.search_by_embedding(o, _unit(0), artifact=A, threshold=True), "threshold"),
        (lambda s, o: s.search_by_embedding(o, _unit(0), artifact=A, threshold="0.1"), "threshold"),
        (lambda s, o: s.search_similar(o, uuid.uuid4(), artifact=A, count=2**31 - 1), "count"),
        (lambda s, o: s.search_by_embedding(o, _unit(0), artifact="x" * 2**20), "256 characters"),
        (lambda s, o: s.search_by_embedding(o, _unit(0), artifact="a\x00"), "NUL"),
        (lambda s, o: s.add_scene(o, BAD_TEXT["nul"]), "frame_path contains a NUL"),
        (lambda s, o: s.add_scene(o, BAD_TEXT["surrogate"]), "frame_path is not valid Unicode"),
        (lambda s, o: s.add_scene(o, "a.jpg", scene_index=2**31), "scene_index"),
        (lambda s, o: s.add_scene(o, "a.jpg", video_id="v1"), "video_id is not a UUID"),
        (lambda s, o: s.add_scene("not-a-uuid", "a.jpg"), "owner_id is not a UUID"),
        (lambda s, o: s.upsert_scene(o, "a.jpg", _unit(0), {"t": float("nan")}, artifact=A), "NaN"),
        (
            lambda s, o: s.upsert_scene(o, "a.jpg", _unit(0), {"t": [1, float("inf")]}, artifact=A),
            "infinity",
        ),
        (lambda s, o: s.upsert_scene(o, "a.jpg", None, {"error": "x\x00"}, artifact=A), "NUL"),
        (lambda s, o: s.upsert_scene(o, "a.jpg", None, {"caf\udce9": 1}, artifact=A), "Unicode"),
        (lambda s, o: s.upsert_scene(o, "a.jpg", None, {1: 1}, artifact=A), "non-string key"),
        (lambda s, o: s.upsert_scene(o, "a.jpg", None, {"x": {1, 2}}, artifact=A), "not JSON"),
        (
            lambda s, o: s.upsert_scene(o, "a.jpg", _unit(0), {}, artifact="x" * 2**20),
            "256 characters",
        ),
        (lambda s, o: s.search_similar(o, "not-a-uuid", artifact=A), "scene_id is not a UUID"),
    ],
)
def test_bad_api_values_are_one_line_typed_errors(pool, call, says):
    store, owner = SceneStore(pool), uuid.uuid4()
    with pytest.raises(InvalidInputError) as info:
        call(store, owner)
    message = str(info.value)
    assert says in message and "\n" not in message and len(message) < 400
    assert isinstance(info.value, ValueError)  # as before: callers catching ValueError
    with pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM scenes").fetchone()[0] == 0


def test_stats_tolerate_stray_metadata(pool):
    """A writer storing a string or a huge number as inference_time_ms breaks neither the
    figures nor `stats --json` (valid JSON, no NaN)."""
    store, owner = SceneStore(pool), uuid.uuid4()
    for i, latency in enumerate(('"slow"', "1e400", '{"ms": 3}', "4", "8")):
        scene = store.upsert_scene(owner, f"{i}.jpg", _unit(i), {}, artifact=A)
        with pool.connection() as conn:
            conn.execute(
                "UPDATE scenes SET visual_clip_metadata = jsonb_build_object("
                "'inference_time_ms', %s::jsonb) WHERE id = %s",
                (latency, scene),
            )
    stats = clip_stats(pool, Scope(owner_id=owner))
    assert stats.latency_mean_ms == 6.0 and stats.latency_p50_ms == 6.0
    json.loads(json.dumps(stats.to_dict(), allow_nan=False))


def test_pg_data_pointing_at_a_file_is_a_clear_error(tmp_path, capsys, monkeypatch):
    not_a_dir = tmp_path / "pgdata"
    not_a_dir.write_text("x")
    with pytest.raises(DatabaseError, match="exists and is not a directory"):
        start_embedded(not_a_dir)
    with pytest.raises(DatabaseError, match="cannot create"):
        start_embedded(not_a_dir / "inside")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("HEIMDEX_PG_DATA", str(not_a_dir))
    line = one_line_error(capsys, ["stats", "--all-owners"])
    assert "not a directory" in line and "unexpected" not in line


@pytest.mark.parametrize("target", ["dir", "/dev/full", "missing/page.html"])
def test_html_to_a_bad_target_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch, target):
    (tmp_path / "dir").mkdir()
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    line = one_line_error(
        capsys, ["search", "--text", "a dog", "--owner", str(uuid.uuid4()), "--html", target]
    )
    assert "cannot write the HTML page" in line and "unexpected" not in line
    with pytest.raises(OutputError):
        write_page(target, "<html></html>")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_html_page_is_written_whole_even_for_a_non_utf8_query(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("old")
    write_page(page, "<p>caf\udce9</p>")  # a lone surrogate, as argv decodes bad bytes
    assert page.read_bytes() == b"<p>caf\\udce9</p>"
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # no temporary file left


@pytest.mark.parametrize(
    "argv",
    [
        ["db", "promote", "--all-owners", "--artifact", "x" * 2**20],
        ["db", "prune", "--all-owners", "--artifact", "x" * 2**20],
        ["db", "prune", "--all-owners", "--artifact", "a\udcffb"],
    ],
)
def test_cli_artifact_ids_sql_cannot_hold_are_one_line(pool, db_url, capsys, monkeypatch, argv):
    line = one_line_error(capsys, argv, monkeypatch, db_url)
    assert "artifact" in line and "unexpected" not in line and len(line) < 300


def test_write_vector_refuses_before_any_sql_so_the_batch_goes_on(pool):
    """The backfill writes a batch in one transaction: a refused vector (e.g. a zero vector
    from a broken model) must not abort it, so it is checked before any statement."""
    store, owner = SceneStore(pool), uuid.uuid4()
    bad, good = store.add_scene(owner, "bad.jpg"), store.add_scene(owner, "good.jpg")
    with pool.connection() as conn, conn.transaction():
        with pytest.raises(InvalidVectorError):
            write_vector(conn, bad, owner, A, NO_COSINE["zero"], {})
        with pytest.raises(InvalidInputError):
            write_vector(conn, bad, owner, A, None, {"error": float("nan")})
        assert write_vector(conn, good, owner, A, _unit(6), {"inference_time_ms": 1.5})
    assert store.get_scene(owner, good)["embedding_visual_clip"] is not None
    assert store.get_scene(owner, bad)["visual_clip_metadata"] is None
