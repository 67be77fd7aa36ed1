"""Step 2: export ``encode_image`` to an fp32 ONNX graph.

Dynamic batch axis, L2 normalisation inside the graph, PyTorch's fused MHA fastpath
disabled (it exports as an opaque op that ONNX Runtime cannot fuse or quantize). The graph
has two outputs: ``image_embeds`` (unit norm, ``encode_image(x, normalize=True)``) and
``image_features`` (before normalisation, for CLIP_NORMALIZE=false); ONNX Runtime computes
only the output a caller asks for plus what it depends on.
"""

from __future__ import annotations

import contextlib
import copy
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


class ExportSelfAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` self-attention, rewritten for a lean ONNX graph.

    The same weights and arithmetic as PyTorch's ``multi_head_attention_forward`` for a
    batch-first self-attention without mask, but laid out so the export has one fused QKV
    MatMul, one split and three transposes per layer instead of the ~8 transposes and a
    dozen reshapes/gathers that tracing ``nn.MultiheadAttention`` produces (those layout
    ops were a fifth of the INT8 graph's time). The parity gate checks the result against
    the untouched open_clip model.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.scale = float(self.head_dim) ** -0.5
        embed = mha.embed_dim
        self.qkv = torch.nn.Linear(embed, 3 * embed, bias=mha.in_proj_bias is not None)
        self.qkv.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.qkv.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    @staticmethod
    def supports(module: torch.nn.Module) -> bool:
        return (isinstance(module, torch.nn.MultiheadAttention) and module.batch_first
                and module._qkv_same_embed_dim and module.bias_k is None
                and module.dropout == 0.0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None):
        if attn_mask is not None or key is not query or value is not query:
            raise ValueError("ExportSelfAttention handles unmasked self-attention only")
        batch, length, embed = query.shape
        qkv = self.qkv(query).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
        scores = torch.matmul(q * self.scale, k.transpose(-2, -1))
        context = torch.matmul(scores.softmax(dim=-1), v)
        return self.out_proj(context.transpose(1, 2).reshape(batch, length, embed)), None


def lean_attention_copy(clip_model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A copy of the model whose image-tower attention layers are ExportSelfAttention.

    Returns the copy and how many layers were replaced (0 when the tower has none that
    qualify, e.g. a ResNet or a masked attention: then the copy equals the original).
    """
    lean = copy.deepcopy(clip_model)
    replaced = 0
    for module in lean.visual.modules():
        attn = getattr(module, "attn", None)
        if attn is not None and ExportSelfAttention.supports(attn):
            module.attn = ExportSelfAttention(attn)
            replaced += 1
    return lean, replaced


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_visual(clip_model: torch.nn.Module, image_size: int, out_path: Path,
                  lean_attention: bool = True) -> int:
    """Write the fp32 visual encoder to ``out_path`` as one self-contained ONNX file.

    Returns how many attention layers were exported as ExportSelfAttention.
    """
    replaced = 0
    if lean_attention:
        clip_model, replaced = lean_attention_copy(clip_model)
        log.info("exporting with lean attention in %d layers", replaced)
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
    return replaced
