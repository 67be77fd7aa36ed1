"""Every ```python block of README.md and docs/*.md runs, against the test artifact.

Blocks are discovered when the tests are collected (one test per block, named
``<page>:<line>``), so a page rewritten or added is covered without touching this file.

The conventions a snippet can rely on (and the only ones):

* Only blocks fenced as ```python run, each on its own, in a fresh namespace. A block that
  is not Python or not meant to run is fenced as something else (```bash, ```sql,
  ```text); there is no skip marker.
* The block runs in an empty temporary working directory, with no ``CLIP_*`` setting from
  the calling shell, and ``CLIP_ENABLED=true``, ``CLIP_MODEL_DIR=./models``,
  ``CLIP_CACHE_DIR`` set to a temporary directory.
* Model directories: ``./models/ViT-B-32__openai`` (what the default settings look for) and
  any ``models/<MODEL>__<PRETRAINED>`` path written in the block are links to the test
  artifact (``HEIMDEX_TEST_MODEL_DIR``: a seeded random-init ViT-B-32, so vectors are real
  but not semantic).
* Every relative image path written in the block as a string literal (``.jpg``, ``.jpeg``,
  ``.png``, ``.webp``, ``.bmp``) exists: a real photograph (scikit-image's samples).
* Names a block uses without defining them come from this context, and no others:
  ``frames`` and ``images`` (three photograph paths), ``video_scenes`` (two scenes, lists of
  frame paths), ``embedder`` (a loaded ``ClipEmbedder`` on the test artifact); and, for
  blocks about the database, ``pool`` and ``store`` (a migrated database on an embedded
  PostgreSQL + pgvector server, started only when a block needs it), ``owner_id`` (an owner
  whose three scenes are indexed) and ``scene_id`` (one of those scenes). Anything else a
  block uses must be imported or defined in it.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from heimdex_clip import ClipConfig, ClipEmbedder, reset_embedder

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
IMAGE = re.compile(r"\.(jpe?g|png|webp|bmp)$", re.IGNORECASE)
MODEL_PATH = re.compile(r"(?:^|/)(models/[\w.-]+__[\w.-]+)")
DATABASE_NAMES = {"pool", "store", "owner_id", "scene_id"}
CONTEXT_NAMES = {"frames", "images", "video_scenes", "embedder"} | DATABASE_NAMES


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [
        Block(page, text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)
    ]


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def free_names(tree: ast.AST) -> set[str]:
    """Names read but never bound in the block (nor builtins)."""
    bound: set[str] = set()
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound - set(dir(builtins))


def string_literals(tree: ast.AST) -> list[str]:
    return [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def _save_photo(photos, index: int, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photos[index % len(photos)][1].save(path)
    return path


@pytest.fixture(scope="module")
def docs_database(artifact_dir, photos, tmp_path_factory):
    """An embedded PostgreSQL + pgvector, migrated, with one owner's three scenes indexed."""
    from heimdex_clip.db.connection import open_pool, start_embedded
    from heimdex_clip.db.migrate import migrate
    from heimdex_clip.db.store import SceneStore

    folder = tmp_path_factory.mktemp("docs-db")
    pool = open_pool(start_embedded(folder / "pgdata"), max_size=4)
    migrate(pool)
    store = SceneStore(pool)
    embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=artifact_dir)).load()
    owner = uuid.uuid4()
    paths = [str(_save_photo(photos, i, folder / f"scene_{i}.jpg")) for i in range(3)]
    scene_ids = [
        store.upsert_scene(
            owner, path, result.embedding, result.metadata, artifact=embedder.artifact_id
        )
        for path, result in zip(paths, embedder.embed_frames(paths), strict=True)
    ]
    yield {"pool": pool, "store": store, "owner_id": owner, "scene_id": scene_ids[0]}
    pool.close()


@pytest.fixture
def docs_workdir(tmp_path, monkeypatch, artifact_dir):
    """The empty working directory and clean CLIP_* environment every block starts from."""
    for key in [k for k in os.environ if k.startswith("CLIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CLIP_ENABLED", "true")
    monkeypatch.setenv("CLIP_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / ".cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ViT-B-32__openai").symlink_to(artifact_dir.resolve())
    reset_embedder()
    yield tmp_path
    reset_embedder()


def test_the_readme_has_examples_to_run():
    # A discovery that finds nothing would make every page "pass".
    assert any(block.page.name == "README.md" for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_example_runs(block: Block, docs_workdir: Path, artifact_dir, photos, request):
    run_block(block, docs_workdir, artifact_dir, photos, request)


def test_a_broken_example_fails(docs_workdir: Path, artifact_dir, photos, request):
    # The runner can fail: an undefined name, and an exception inside the block.
    page = REPO / "README.md"
    with pytest.raises(AssertionError, match="without defining"):
        run_block(
            Block(page, 0, "print(search_results)\n"), docs_workdir, artifact_dir, photos, request
        )
    with pytest.raises(FileNotFoundError):
        run_block(
            Block(page, 0, "open('notes.txt').read()\n"),
            docs_workdir,
            artifact_dir,
            photos,
            request,
        )
    run_block(
        Block(page, 0, "from PIL import Image\nImage.open('x/y.png').load()\n"),
        docs_workdir,
        artifact_dir,
        photos,
        request,
    )  # image literals exist


def run_block(
    block: Block, docs_workdir: Path, artifact_dir: Path, photos, request: pytest.FixtureRequest
) -> None:
    """Run one block under the conventions of this module's docstring."""
    tree = ast.parse(block.code, filename=block.name)
    for text in string_literals(tree):
        for model_path in MODEL_PATH.findall(text):
            link = docs_workdir / model_path
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(artifact_dir.resolve())
    literals = [t for t in string_literals(tree) if IMAGE.search(t) and not Path(t).is_absolute()]
    for index, text in enumerate(literals):
        if not (docs_workdir / text).exists():
            _save_photo(photos, index, docs_workdir / text)

    missing = free_names(tree)
    unknown = missing - CONTEXT_NAMES
    assert not unknown, (
        f"{block.name} uses {sorted(unknown)} without defining them; import "
        f"or define them in the block (context names: {sorted(CONTEXT_NAMES)})"
    )
    frames = [
        str(_save_photo(photos, i, docs_workdir / "frames" / f"frame_{i}.jpg")) for i in range(3)
    ]
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    context: dict[str, object] = {
        "frames": frames,
        "images": list(frames),
        "video_scenes": [frames[:2], frames[2:]],
    }
    if "embedder" in missing:
        context["embedder"] = ClipEmbedder(
            config=ClipConfig(pretrained="none", model_dir=artifact_dir)
        ).load()
    if missing & DATABASE_NAMES:
        context.update(request.getfixturevalue("docs_database"))
    namespace.update({name: context[name] for name in missing})
    exec(compile(tree, block.name, "exec"), namespace)  # the docs' own code
