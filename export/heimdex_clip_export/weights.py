"""Step 1: load the open_clip model whose image tower we export.

``pretrained`` is one of: an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...), a path
to a local checkpoint, or ``none`` for a seeded random initialisation. The activation
(QuickGELU or GELU) follows the weights, not the bare model config: the ``openai`` weights
were trained with QuickGELU and silently degrade in a GELU graph.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch

from heimdex_clip.artifact import is_checkpoint_path, weights_label

log = logging.getLogger(__name__)

#: open_clip model configs of our own (the rehearsal model), registered before any load.
HOUSE_CONFIGS = Path(__file__).parent / "model_configs"

#: How long we wait for a model hub before declaring the network unreachable.
HUB_PROBE_TIMEOUT_S = 4.0


class WeightsError(RuntimeError):
    """The requested weights cannot be loaded (unknown tag, no network, bad checkpoint)."""


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    model_name: str
    #: What the manifest records: heimdex_clip.artifact.weights_label of PRETRAINED.
    pretrained: str
    random_init: bool
    seed: int | None
    quick_gelu: bool
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str
    fill_color: int


def register_house_configs() -> None:
    """Make ``HOUSE_CONFIGS`` known to open_clip (idempotent)."""
    if any(p.stem not in open_clip.list_models() for p in HOUSE_CONFIGS.glob("*.json")):
        open_clip.add_model_config(HOUSE_CONFIGS)


def resolve_quick_gelu(model_name: str, pretrained: str) -> bool:
    """QuickGELU as the weights need it.

    A tag answers for itself. A random init or a local checkpoint uses the architecture of
    the model's ``openai`` weights where open_clip has them (the production default), so
    that tests exercise the production graph; otherwise the model config's own choice.
    """
    is_tag = not (is_checkpoint_path(pretrained) or pretrained.lower() == "none")
    tag = pretrained if is_tag else None
    if tag is None and "openai" in open_clip.list_pretrained_tags_by_model(model_name):
        tag = "openai"
    if tag is not None:
        return bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
    config = open_clip.get_model_config(model_name) or {}
    return bool(config.get("quick_gelu", False))


def _hub_hosts(model_name: str, tag: str) -> list[str]:
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hosts = []
    if cfg.get("hf_hub"):
        hosts.append(urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname)
    if cfg.get("url"):
        hosts.append(urlparse(cfg["url"]).hostname)
    return [h for h in hosts if h]


def _reachable(host: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_network_for_tag(model_name: str, tag: str) -> None:
    """Fail within seconds, not after minutes of hub retries, when no hub can be reached."""
    hosts = _hub_hosts(model_name, tag)
    if hosts and not any(_reachable(h) for h in hosts):
        raise WeightsError(
            f"cannot download the '{tag}' weights for {model_name}: no model hub is reachable "
            f"({', '.join(hosts)}). Offline, either export a seeded random initialisation "
            "with PRETRAINED=none (tests only: embeddings are not semantic), or download the "
            "checkpoint elsewhere and pass its path: PRETRAINED=/path/to/checkpoint.bin"
        )


def _preprocess_config(model: torch.nn.Module) -> dict:
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise WeightsError(f"non-square image size {size} is not supported")
        size = size[0]
    return {
        "image_size": int(size),
        "mean": tuple(float(x) for x in cfg["mean"]),
        "std": tuple(float(x) for x in cfg["std"]),
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "resize_mode": str(cfg.get("resize_mode", "shortest")),
        "fill_color": int(cfg.get("fill_color", 0)),
    }


def load_model(
    model_name: str,
    pretrained: str,
    *,
    seed: int = 0,
    cache_dir: str | None = None,
    quick_gelu: bool | None = None,
) -> LoadedModel:
    """Load ``model_name`` with the requested weights, in eval mode, on the CPU."""
    register_house_configs()
    if model_name not in open_clip.list_models():
        raise WeightsError(f"unknown open_clip model {model_name!r}")
    if quick_gelu is None:
        quick_gelu = resolve_quick_gelu(model_name, pretrained)

    random_init = pretrained.lower() == "none"
    if random_init:
        torch.manual_seed(seed)
        weights, recorded = None, "none"
    elif is_checkpoint_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist")
        weights, recorded = str(path), weights_label(pretrained)
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise WeightsError(
                f"{model_name} has no pretrained tag {pretrained!r}; known tags: "
                f"{', '.join(tags) or '(none)'}; or pass a checkpoint path or 'none'"
            )
        _check_network_for_tag(model_name, pretrained)
        weights, recorded = pretrained, pretrained

    log.info("loading %s (pretrained=%s, quick_gelu=%s)", model_name, recorded, quick_gelu)
    try:
        model = open_clip.create_model(
            model_name,
            pretrained=weights,
            device="cpu",
            force_quick_gelu=quick_gelu,
            cache_dir=cache_dir,
        )
    except Exception as exc:  # open_clip raises many types (RuntimeError, OSError, HF errors)
        raise WeightsError(f"open_clip could not load {model_name} ({recorded}): {exc}") from exc
    model.eval()
    embed_dim = int(model.visual.output_dim)
    return LoadedModel(
        model=model,
        model_name=model_name,
        pretrained=recorded,
        random_init=random_init,
        seed=seed if random_init else None,
        quick_gelu=quick_gelu,
        embed_dim=embed_dim,
        **_preprocess_config(model),
    )
