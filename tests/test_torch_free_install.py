"""The runtime installs and embeds in a fresh virtual environment without torch.

This is the Docker runtime stage without Docker: build the wheel, install it with the base
dependencies only, copy the INT8 artifact in, embed a JPEG and a query text through the API
and the CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from heimdex_clip import ClipConfig, ClipEmbedder

REPO = Path(__file__).resolve().parents[1]

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


@pytest.mark.slow
def test_runtime_wheel_installs_and_embeds_without_torch(artifact_dir, photos, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                    str(REPO)], check=True)
    wheel = next(wheels.glob("heimdex_clip-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True)

    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                               capture_output=True, text=True, check=True).stdout
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
    out = subprocess.run([str(python), "-c", SCRIPT, str(artifact), str(jpeg), query],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"], report["error"]
    assert report["text_ok"], report["text_error"]
    assert report["torch_in_modules"] is False
    here = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=artifact))
    np.testing.assert_allclose(np.array(report["embedding"], np.float32),
                               here.embed_images([jpeg])[0], atol=1e-5)
    np.testing.assert_allclose(np.array(report["text_embedding"], np.float32),
                               here.embed_texts([query])[0], atol=1e-5)
    open_clip = pytest.importorskip("open_clip")
    assert report["tokens"] == open_clip.tokenize([query]).tolist()

    cli = subprocess.run([str(venv / "bin" / "heimdex-clip"), "--model-dir", str(artifact),
                          "embed", str(jpeg), "--text", query, "--json"], capture_output=True,
                         text=True, env={"CLIP_PRETRAINED": "none", "PATH": "/usr/bin:/bin"})
    assert cli.returncode == 0, cli.stderr
    image_row, text_row = json.loads(cli.stdout)
    assert image_row["ok"] and image_row["dim"] == 512 and abs(image_row["norm"] - 1) < 1e-3
    assert text_row["text"] == query and text_row["ok"] and text_row["dim"] == 512
    assert abs(text_row["norm"] - 1) < 1e-3
