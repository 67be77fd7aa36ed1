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
from dataclasses import asdict, dataclass
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
    batch-first self-attention (without mask, or with an additive float mask such as the
    text tower's causal one), but laid out so the export has one fused QKV
    MatMul, one split and three transposes per layer instead of the ~8 transposes and a
    dozen reshapes/gathers that tracing ``nn.MultiheadAttention`` produces (those layout
    ops were a fifth of the INT8 graph's time). The parity gate checks the result against
    the untouched open_clip model.

    With ``query_tokens=n`` only the first ``n`` tokens are queried (keys and values still
    come from every token): the output has ``n`` tokens. ClassTokenBlock uses it.

    With ``onnx_attention=True`` (the text tower, exported at opset 23) the core is
    ``torch.onnx.ops.attention``: Q, K and V split off the QKV projection, the additive mask
    as is, exported as one ONNX ``Attention`` op per layer (PyTorch runs the op's reference
    implementation, so the parity gate still compares against open_clip). The image tower
    keeps the MatMul form: its attention is fused after quantization (attention_fusion.py),
    where Q, K and V get their own per-row INT8 GEMMs.
    """

    def __init__(
        self,
        mha: torch.nn.MultiheadAttention,
        query_tokens: int | None = None,
        onnx_attention: bool = False,
    ) -> None:
        super().__init__()
        if onnx_attention and query_tokens is not None:
            raise ValueError("the ONNX Attention form queries every token")
        self.onnx_attention = onnx_attention
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.scale = float(self.head_dim) ** -0.5
        self.query_tokens = query_tokens
        embed = mha.embed_dim
        weight, bias = mha.in_proj_weight, mha.in_proj_bias
        if query_tokens is None:
            self.qkv = _linear(weight, bias)
        else:  # Q from a few tokens, K and V from all: two MatMuls instead of the fused one
            self.q = _linear(weight[:embed], None if bias is None else bias[:embed])
            self.kv = _linear(weight[embed:], None if bias is None else bias[embed:])
        self.out_proj = mha.out_proj

    @staticmethod
    def supports(module: torch.nn.Module) -> bool:
        return (
            isinstance(module, torch.nn.MultiheadAttention)
            and module.batch_first
            and module._qkv_same_embed_dim
            and module.bias_k is None
            and not module.add_zero_attn
            and module.dropout == 0.0
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ):
        if key is not query or value is not query:
            raise ValueError("ExportSelfAttention handles self-attention only")
        if attn_mask is not None and (
            attn_mask.dtype == torch.bool or self.query_tokens is not None
        ):
            raise ValueError("ExportSelfAttention takes an additive float mask, all queries")
        batch, length, embed = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        if self.onnx_attention:
            q, k, v = self.qkv(query).split(embed, dim=-1)  # each [B, L, E]
            context = torch.onnx.ops.attention(
                q, k, v, attn_mask, q_num_heads=heads, kv_num_heads=heads, scale=self.scale
            )[0]
            return self.out_proj(context), None
        if self.query_tokens is None:
            qkv = self.qkv(query).reshape(batch, length, 3, heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
            out_length = length
        else:
            out_length = self.query_tokens
            q = self.q(query[:, :out_length]).reshape(batch, out_length, heads, head_dim)
            q = q.transpose(1, 2)
            kv = self.kv(query).reshape(batch, length, 2, heads, head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.matmul(q * self.scale, k.transpose(-2, -1))
        if attn_mask is not None:  # additive, as nn.MultiheadAttention applies a float mask
            scores = scores + attn_mask
        context = torch.matmul(scores.softmax(dim=-1), v)
        context = context.transpose(1, 2).reshape(batch, out_length, embed)
        return self.out_proj(context), None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """A Linear sharing (not copying) the given weight and bias."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
    return linear


class PatchEmbedLinear(torch.nn.Module):
    """The patch-embedding Conv2d (kernel == stride, no padding) as unfold + Linear.

    Same output as the convolution, [B, width, grid_h, grid_w]. Exported as a MatMul, it is
    quantized with the rest of the tower instead of staying a float Conv.
    """

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.patch = conv.kernel_size[0]
        self.linear = _linear(conv.weight.reshape(conv.out_channels, -1), conv.bias)

    @staticmethod
    def supports(conv: torch.nn.Module, image_size: int) -> bool:
        return (
            isinstance(conv, torch.nn.Conv2d)
            and conv.groups == 1
            and conv.kernel_size[0] == conv.kernel_size[1]
            and conv.kernel_size == conv.stride
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and image_size % conv.kernel_size[0] == 0
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = pixels.shape
        p = self.patch
        grid_h, grid_w = height // p, width // p
        # [B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p]: each patch flattened in the
        # (channel, row, column) order of the conv weight.
        patches = pixels.reshape(batch, channels, grid_h, p, grid_w, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid_h * grid_w, -1)
        tokens = self.linear(patches)  # [B, gh*gw, width]
        return tokens.transpose(1, 2).reshape(batch, -1, grid_h, grid_w)


class ClassTokenBlock(torch.nn.Module):
    """The tower's last residual block, computing only the class token's output.

    With class-token pooling, nothing after the last block reads the other tokens, and a
    block's attention, MLP and norms act per token: only the class token's query, output
    projection and MLP are needed (keys and values still come from every token). For
    ViT-B-32 this skips 6.6% of the tower's multiply-adds (counted from its shapes) and
    changes no output.
    """

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.ln_1, self.ln_2, self.mlp = block.ln_1, block.ln_2, block.mlp
        self.ls_1, self.ls_2 = block.ls_1, block.ls_2
        self.attn = ExportSelfAttention(block.attn, query_tokens=1)

    @staticmethod
    def supports(visual: torch.nn.Module) -> bool:
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if not blocks:
            return False
        last = blocks[-1]
        return (
            getattr(visual, "attn_pool", None) is None
            and getattr(visual, "pool_type", None) == "tok"
            and not getattr(visual, "output_tokens", True)
            and getattr(visual.transformer, "batch_first", False)
            and type(last).__name__ == "ResidualAttentionBlock"
            and not hasattr(last, "ln_1_kv")
            and ExportSelfAttention.supports(getattr(last, "attn", None))
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("ClassTokenBlock handles unmasked self-attention only")
        normed = self.ln_1(x)
        x = x[:, :1] + self.ls_1(self.attn(normed, normed, normed)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


@dataclass(frozen=True)
class Rewrites:
    """Which exact rewrites export_ready_copy applied (recorded in the manifest)."""

    attention_layers: int = 0
    patch_embed_as_matmul: bool = False
    class_token_last_block: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def export_ready_copy(
    clip_model: torch.nn.Module, image_size: int
) -> tuple[torch.nn.Module, Rewrites]:
    """A copy of the model with the image tower rewritten for a fast ONNX graph.

    Three rewrites, each exact (same function, same weights) and each applied only where
    the tower qualifies: attention as ExportSelfAttention, the patch embedding as
    PatchEmbedLinear, the last block as ClassTokenBlock. The original is not touched; the
    export's parity gate compares the ONNX graph against it.
    """
    ready = copy.deepcopy(clip_model)
    visual = ready.visual
    class_token = ClassTokenBlock.supports(visual)
    if class_token:
        visual.transformer.resblocks[-1] = ClassTokenBlock(visual.transformer.resblocks[-1])
    attention_layers = int(class_token)
    for module in visual.modules():
        attn = getattr(module, "attn", None)
        if attn is not None and ExportSelfAttention.supports(attn):
            module.attn = ExportSelfAttention(attn)
            attention_layers += 1
    patch_linear = PatchEmbedLinear.supports(getattr(visual, "conv1", None), image_size)
    if patch_linear:
        visual.conv1 = PatchEmbedLinear(visual.conv1)
    return ready, Rewrites(attention_layers, patch_linear, class_token)


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_visual(
    clip_model: torch.nn.Module, image_size: int, out_path: Path, rewrites: bool = True
) -> Rewrites:
    """Write the fp32 visual encoder to ``out_path`` as one self-contained ONNX file.

    With ``rewrites`` (the default) the tower goes through export_ready_copy first; returns
    what was rewritten.
    """
    applied = Rewrites()
    if rewrites:
        clip_model, applied = export_ready_copy(clip_model, image_size)
        log.info("exporting with rewrites: %s", applied)
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
    log.info(
        "exported fp32 visual encoder to %s (%.1f MB)", out_path, out_path.stat().st_size / 1e6
    )
    return applied
