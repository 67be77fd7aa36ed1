"""Step 2: export ``encode_image`` to an fp32 ONNX graph.

Dynamic batch axis, L2 normalisation inside the graph, PyTorch's fused MHA fastpath
disabled (it exports as an opaque op that ONNX Runtime cannot fuse or quantize). The graph
has two outputs: ``image_embeds`` (unit norm, ``encode_image(x, normalize=True)``) and
``image_features`` (before normalisation, for CLIP_NORMALIZE=false); ONNX Runtime computes
only the output a caller asks for plus what it depends on.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
RAW_OUTPUT_NAME = "image_features"
OPSET = 18


class VisualEncoder(torch.nn.Module):
    """The image tower as the runtime calls it: pixels in, (unit-norm, raw) embeddings out."""

    def __init__(self, clip_model: torch.nn.Module) -> None:
        super().__init__()
        self.clip_model = clip_model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.clip_model.encode_image(pixel_values, normalize=False)
        # Exactly what encode_image(normalize=True) computes.
        return F.normalize(features, dim=-1), features


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_visual(clip_model: torch.nn.Module, image_size: int, out_path: Path) -> None:
    """Write the fp32 visual encoder to ``out_path`` as one self-contained ONNX file."""
    encoder = VisualEncoder(clip_model).eval()
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with mha_fastpath_disabled(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter; the parity gate judges the result
        torch.onnx.export(
            encoder,
            (example,),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, RAW_OUTPUT_NAME],
            dynamic_shapes={"pixel_values": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    log.info("exported fp32 visual encoder to %s (%.1f MB)", out_path,
             out_path.stat().st_size / 1e6)
