"""The text tower: query texts in, CLIP vectors (comparable with the image vectors) out.

An artifact may lack the tower (older exports, models whose tokenizer the runtime cannot
reproduce): it still loads for images, and every text call raises TextError saying so.

The graph takes ``[batch, length]`` token ids with ``length`` <= 77: with a causal mask
and end-of-text pooling nothing after a text's end-of-text token reaches its vector, so a
batch is cut to its longest text (a short query runs a few positions instead of 77; the
export's parity gate checks the cut runs against PyTorch's full ones).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .artifact import Manifest
from .config import ClipConfig
from .errors import ArtifactError, TextError
from .frames import EmbeddingCache
from .manifest_schema import require_bool, require_dict, require_int, require_str
from .session import create_session
from .tokenizer import ClipTokenizer, check_texts
from .vectors import check_vectors
from .verified import PinnedFiles, read_verified, verified_source

log = logging.getLogger("heimdex_clip")

INPUT_NAME = "input_ids"
OUTPUT_NAME = "text_embeds"
RAW_OUTPUT_NAME = "text_features"
NO_TEXT_TOWER = (
    "this artifact has no text tower (exported without one); re-export it with "
    "a current heimdex_clip_export to search by text"
)


def active_length(ids: np.ndarray) -> int:
    """Positions a batch needs: through its longest text's end-of-text token (the largest
    id, as open_clip's argmax pooling finds it)."""
    if ids.size == 0:
        return 1
    return int(ids.argmax(axis=1).max()) + 1


@dataclass(frozen=True)
class TextSpec:
    """The manifest's ``text`` section: how to tokenize and which graph to run."""

    graph_key: str
    context_length: int
    special_tokens: tuple[str, ...]
    token_dtype: str
    cut_to_longest: bool

    @classmethod
    def from_manifest(cls, manifest: Manifest, precision: str) -> TextSpec:
        """The spec, with the graph for ``precision`` (or the only one shipped); TextError
        when the artifact has no text tower."""
        section = manifest.extra.get("text")
        graphs = sorted(k for k, f in manifest.files.items() if f.role == "text")
        if not isinstance(section, dict) or not graphs or "tokenizer" not in manifest.files:
            raise TextError(NO_TEXT_TOWER)
        key = f"text.{precision}" if f"text.{precision}" in graphs else graphs[0]
        try:  # type-exact, like the rest of the manifest (manifest_schema)
            tok = require_dict(section["tokenizer"], "text.tokenizer")
            specials = tok["special_tokens"]
            if not isinstance(specials, list):
                raise ArtifactError(
                    "malformed manifest: text.tokenizer.special_tokens must be a list"
                )
            spec = cls(
                graph_key=key,
                context_length=require_int(
                    tok["context_length"], "text.tokenizer.context_length", 2, 4096
                ),
                special_tokens=tuple(
                    require_str(t, "text.tokenizer.special_tokens") for t in specials
                ),
                token_dtype=require_str(section.get("token_dtype", "int64"), "text.token_dtype"),
                cut_to_longest=require_bool(
                    section.get("cut_to_longest", False), "text.cut_to_longest"
                ),
            )
        except KeyError as exc:
            raise ArtifactError(f"malformed text section in the manifest: {exc}") from exc
        if spec.token_dtype not in ("int32", "int64") or not 2 <= spec.context_length <= 4096:
            raise ArtifactError(
                f"the manifest's text section asks for {spec.token_dtype} ids "
                f"and {spec.context_length} positions; not a CLIP text tower"
            )
        return spec


def has_text_tower(manifest: Manifest) -> bool:
    """Whether the artifact ships a text graph and its tokenizer."""
    try:
        TextSpec.from_manifest(manifest, "int8")
    except TextError:
        return False
    return True


class TextTower:
    """The verified text graph and tokenizer of an artifact, ready to embed.

    Args:
        artifact_dir: the artifact directory (holding manifest.json).
        manifest: its parsed manifest.
        config: runtime settings (precision, threads, device, arena, normalize, batch size).
        cache_size: repeated texts (the exact string) are embedded once; 0 = off.
        pinned: descriptors opened when the image tower was loaded; the files are read
            through them, so the text tower is of the same version even if it was deleted.

    Raises TextError if the artifact has no text tower, ArtifactError if a file is missing,
    altered or unloadable.
    """

    def __init__(
        self,
        artifact_dir: Path,
        manifest: Manifest,
        config: ClipConfig,
        cache_size: int = 256,
        pinned: PinnedFiles | None = None,
    ) -> None:
        self.spec = TextSpec.from_manifest(manifest, config.precision)
        self.config = config
        self.embed_dim = manifest.model.embed_dim
        self.entry = manifest.file(self.spec.graph_key)
        tokenizer_entry = manifest.file("tokenizer")

        def fd(path: str) -> int | None:
            return pinned.fd(path) if pinned is not None else None

        tokenizer_json = read_verified(
            artifact_dir / tokenizer_entry.path, tokenizer_entry, fd(tokenizer_entry.path)
        )
        try:
            self.tokenizer = ClipTokenizer(
                tokenizer_json.decode("utf-8"), self.spec.context_length, self.spec.special_tokens
            )
            with verified_source(
                artifact_dir / self.entry.path, self.entry, fd(self.entry.path)
            ) as graph:
                self.session, self.session_info = create_session(
                    graph,
                    device=config.device,
                    threads=config.cpu_threads,
                    memory_arena=config.memory_arena,
                )
        except (TextError, ArtifactError):
            raise
        except Exception as exc:  # tokenizers / ONNX Runtime raise their own types
            raise ArtifactError(f"cannot load the text tower: {exc}") from exc
        self.output_name = OUTPUT_NAME if config.normalize else RAW_OUTPUT_NAME
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if inputs != {INPUT_NAME} or self.output_name not in outputs:
            raise ArtifactError(
                f"{self.entry.path} takes {sorted(inputs)} and gives "
                f"{sorted(outputs)}; a text tower takes {INPUT_NAME!r} and "
                f"gives {self.output_name!r}; re-export the model"
            )
        self.precision = self.entry.precision
        self.cache = EmbeddingCache(cache_size)
        log.info(
            "CLIP text tower loaded: %s (%s, %s ids)",
            self.entry.path,
            self.precision,
            self.spec.token_dtype,
        )

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """open_clip.tokenize's ids: int64 [N, context_length]; TextError for bad input."""
        return self.tokenizer(texts)

    def embed_ids(self, ids: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """Run the graph on token ids [N, context_length] (one batch); float32 [N, D]."""
        if self.spec.cut_to_longest:
            ids = ids[:, : active_length(ids)]
        feed = {INPUT_NAME: np.ascontiguousarray(ids, dtype=self.spec.token_dtype)}
        out = self.session.run([self.output_name], feed, run_options)[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    def embed(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        run_options: ort.RunOptions | None = None,
    ) -> np.ndarray:
        """Embed every text, float32 [N, D]; raises TextError for bad input.

        Texts are batched by length (each batch is cut to its longest text, so short
        queries never pay for long ones); the output keeps the input order.
        """
        texts = check_texts(texts)
        batch = batch_size or self.config.batch_size
        if batch < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch}")
        ids = self.tokenize(texts)
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        order = np.argsort(ids.argmax(axis=1), kind="stable")
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            out[rows] = self.embed_ids(ids[rows], run_options)
        return check_vectors(out, "text")

    def embed_one(self, text: str, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """One query's vector, from the LRU when the same text was embedded before."""
        key = None
        if isinstance(text, str):
            raw = f"{self.output_name}\0{text}".encode("utf-8", "surrogatepass")
            key = hashlib.blake2b(raw, digest_size=20).digest()
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        vector = self.embed([text], run_options=run_options)[0]
        self.cache.put(key, vector)
        return vector

    def describe(self) -> dict[str, Any]:
        """What ``heimdex-clip info`` prints about the text tower."""
        return {
            "graph": self.entry.path,
            "precision": self.precision,
            "token_dtype": self.spec.token_dtype,
            "context_length": self.spec.context_length,
            "threads": self.session_info.intra_op_threads,
        }
