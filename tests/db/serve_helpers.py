"""The search service on a loopback port for the serve tests: a real uvicorn server (in a
thread of the test process), a real database with two owners' scenes, real keys."""

from __future__ import annotations

import io
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest
from PIL import Image

pytest.importorskip("fastapi")  # the serve extra (a failure under CI=true)
uvicorn = pytest.importorskip("uvicorn")

from heimdex_clip import ClipConfig, ClipEmbedder  # noqa: E402
from heimdex_clip.db.api_keys import create_key  # noqa: E402
from heimdex_clip.db.store import SceneStore  # noqa: E402
from heimdex_clip.serve.app import create_app  # noqa: E402
from heimdex_clip.serve.settings import ServeSettings  # noqa: E402

JWT_SECRET = "test-secret-of-at-least-thirty-two-bytes!"
TRANSCRIPTS = {0: "a zebra crossing at dusk", 3: "the quarterly sales meeting"}


def patient_embedder(artifact_dir: Path) -> ClipEmbedder:
    """The test artifact's embedder with a patient deadline (CLIP_TIMEOUT_S=30): on a busy
    machine the default 2 s would make admission control refuse the functional tests'
    concurrent requests (503), which the overload test checks on purpose instead. Each
    serve module overrides the ``embedder`` fixture with it."""
    config = ClipConfig(pretrained="none", model_dir=artifact_dir, timeout_s=30.0)
    return ClipEmbedder(config=config).load()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> until stopped."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the service did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def distinct(photos, count: int) -> list:
    """``count`` of the sample photos, all different ("chelsea" is "cat" again: a tie)."""
    return [p for p in photos if p[0] != "chelsea"][:count]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@dataclass
class Owner:
    id: uuid.UUID
    key: str
    scenes: list[uuid.UUID] = field(default_factory=list)
    frames: dict[uuid.UUID, Path] = field(default_factory=dict)

    def token(self, **claims) -> str:
        """An HS256 JWT for this owner, valid five minutes unless ``claims`` say otherwise."""
        body = {"sub": str(self.id), "exp": int(time.time()) + 300, **claims}
        return jwt.encode(
            {k: v for k, v in body.items() if v is not None}, JWT_SECRET, algorithm="HS256"
        )

    def headers(self, kind: str = "key") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key if kind == 'key' else self.token()}"}


def add_owner(
    pool,
    embedder: ClipEmbedder,
    photos,
    media: Path,
    video: uuid.UUID,
    *,
    transcripts: dict[int, str] | None = None,
) -> Owner:
    """An owner with one scene per photo (frames saved under ``media``, embedded, with time
    ranges and, for some, transcripts) and an API key."""
    store = SceneStore(pool)
    owner_id = uuid.uuid4()
    owner = Owner(owner_id, create_key(pool, owner_id, "test")[0])
    folder = media / str(owner_id)
    folder.mkdir(parents=True)
    paths = []
    for i, (name, photo) in enumerate(photos):
        path = folder / f"{i:02d}_{name}.png"
        photo.save(path)
        paths.append(path)
    vectors = embedder.embed_images(paths)
    for i, (path, vector) in enumerate(zip(paths, vectors, strict=True)):
        scene = store.upsert_scene(
            owner_id,
            str(path),
            vector,
            {},
            video_id=video,
            scene_index=i,
            artifact=embedder.artifact_id,
        )
        with pool.connection() as conn:
            conn.execute(
                "UPDATE scenes SET start_s = %s, end_s = %s, transcript = %s WHERE id = %s",
                (i * 10.0, i * 10.0 + 7.5, (transcripts or {}).get(i), scene),
            )
        owner.scenes.append(scene)
        owner.frames[scene] = path
    return owner


def serve(pool, embedder: ClipEmbedder, media: Path, **settings) -> LiveServer:
    app = create_app(
        ServeSettings(media_root=media, jwt_secret=JWT_SECRET, **settings), embedder, pool
    )
    return LiveServer(app)


def client(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60)
