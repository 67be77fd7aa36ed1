"""JPEG file -> vector: our torch-free pipeline against open_clip's own (preprocess + model)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from heimdex_clip import ClipConfig, ClipEmbedder

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def reference_model():
    torch.manual_seed(0)  # the artifact's seed: same weights as the exported graph
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, force_quick_gelu=True
    )
    return model.eval(), preprocess


def _reference(model, preprocess, paths):
    with torch.inference_mode():
        batch = torch.stack([preprocess(Image.open(p)) for p in paths])
        return model.encode_image(batch, normalize=True).numpy()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_file_to_vector_matches_open_clip(
    artifact_dir, photos, tmp_path, reference_model, precision
):
    paths = []
    for i, (name, image) in enumerate(photos[:10]):
        # Odd sizes and both common formats, as frames arrive from video tools.
        image = image.resize((image.width - i, image.height + 2 * i))
        path = tmp_path / f"{name}.{'png' if i % 3 == 0 else 'jpg'}"
        image.save(path)
        paths.append(path)
    ours = ClipEmbedder(
        config=ClipConfig(pretrained="none", model_dir=artifact_dir, precision=precision)
    ).embed_images(paths)
    ref = _reference(*reference_model, paths)
    cosine = np.sum(ours * ref, axis=1)
    if precision == "fp32":
        assert cosine.min() >= 0.99999
    else:
        assert cosine.min() >= 0.98 and cosine.mean() >= 0.995
