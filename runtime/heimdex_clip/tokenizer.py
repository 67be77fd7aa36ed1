"""CLIP text tokenization without torch: the artifact's ``tokenizer.json`` run by Hugging
Face ``tokenizers``, after open_clip's own text cleaning.

Token for token what ``open_clip.tokenize`` returns: start-of-text, the BPE tokens of the
cleaned text, end-of-text, truncated to the context length with the end-of-text token kept,
zero padded. The export builds the file from open_clip's vocabulary and merges and checks
the parity; ``tests/test_tokenizer.py`` checks it again on a hostile corpus.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import ftfy
import numpy as np
from tokenizers import Tokenizer

from .errors import TextError

#: Longer texts are refused (a query, not a document; cleaning is linear but not free).
MAX_TEXT_CHARS = 20_000


def clean_text(text: str) -> str:
    """open_clip's ``lower`` cleaning: ftfy fixes, HTML unescaped twice, whitespace runs
    collapsed, lower-cased."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def check_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list of strings, or TextError naming the first bad one."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TextError(f"expected a sequence of texts (a list of str), got {type(texts).__name__}")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TextError(f"text {i} is {type(text).__name__}, not str")
        if len(text) > MAX_TEXT_CHARS:
            raise TextError(
                f"text {i} has {len(text)} characters; the limit is "
                f"{MAX_TEXT_CHARS} (only the first ~75 tokens are used anyway)"
            )
    return out


class ClipTokenizer:
    """Texts in, ``int64 [N, context_length]`` token ids out (open_clip.tokenize's layout).

    Args:
        tokenizer_json: the contents of the artifact's verified ``tokenizer.json``.
        context_length: tokens per row (77 for CLIP).
        special_tokens: the start- and end-of-text strings.
    """

    def __init__(
        self, tokenizer_json: str, context_length: int, special_tokens: Sequence[str]
    ) -> None:
        self._tok = Tokenizer.from_str(tokenizer_json)
        self.context_length = context_length
        self._specials = tuple(special_tokens)
        # The first step of the pre-tokenizer: open_clip's split pattern, before byte mapping.
        self._split = self._tok.pre_tokenizer[0]
        truncation = self._tok.truncation or {}
        padding = self._tok.padding or {}
        if (
            truncation.get("max_length") != context_length
            or padding.get("length") != context_length
        ):
            raise TextError(f"tokenizer.json does not truncate and pad to {context_length}")

    def _ids(self, cleaned: str) -> list[int]:
        """The ids of one cleaned text (SOT, BPE tokens, EOT, padding).

        A special token's string counts as that token only where open_clip's pattern cuts
        it out as one piece ("x <end_of_text>" yes, "!!<end_of_text>" no), so a text holding
        one is split with the pattern first, then each piece is matched whole (the
        added-token lookup) or BPE-encoded. Other texts go straight through.
        """
        if not any(s in cleaned for s in self._specials):
            return self._tok.encode(cleaned).ids
        pieces = [p for p, _ in self._split.pre_tokenize_str(cleaned)]
        return self._tok.encode(pieces or "", is_pretokenized=bool(pieces)).ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids of each text; TextError for anything but a sequence of str."""
        cleaned = [clean_text(t) for t in check_texts(texts)]
        out = np.zeros((len(cleaned), self.context_length), dtype=np.int64)
        # One text at a time: a query batch is small, and encode_batch would start a
        # thread pool that competes with ONNX Runtime's threads.
        for i, text in enumerate(cleaned):
            out[i] = self._ids(text)
        return out
