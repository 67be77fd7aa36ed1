"""Build the runtime's tokenizer file from open_clip's own vocabulary and merges.

The runtime tokenizes with Hugging Face ``tokenizers`` (Rust, torch-free) from the
``tokenizer.json`` written here; the text cleaning (ftfy, HTML unescape, whitespace,
lower-case) stays in Python on both sides, with the same functions open_clip calls.

open_clip splits the cleaned text with the ``regex`` module and ``re.IGNORECASE``. The
tokenizer file spells that split out exactly: every character class is listed code point
by code point as ``regex`` classifies it here (so the runtime does not depend on another
regex engine's Unicode tables or case folding), and each literal (``'s``, the special
tokens) matches every case variant ``regex`` accepts. One quirk this reproduces:
U+0345 (combining ypogegrammeni) is in none of open_clip's classes under IGNORECASE, so
open_clip drops it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import regex
from open_clip.tokenizer import SimpleTokenizer
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
#: The literal alternatives of open_clip's pattern, in its order (before the classes).
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


class TokenizerExportError(RuntimeError):
    """The model's open_clip tokenizer is not one this export can reproduce."""


def reference_tokenizer(model_name: str) -> SimpleTokenizer:
    """open_clip's tokenizer for ``model_name``, if it is the CLIP BPE we can reproduce."""
    tok = open_clip.get_tokenizer(model_name)
    if not isinstance(tok, SimpleTokenizer):
        raise TokenizerExportError(
            f"{model_name} uses {type(tok).__name__}, not open_clip's SimpleTokenizer"
        )
    if tok.clean_fn.__name__ != "_clean_lower" or tok.reduction_fn is not None:
        raise TokenizerExportError(
            f"{model_name}'s tokenizer cleans or reduces text in a way "
            "the runtime does not reproduce"
        )
    if len(tok.all_special_ids) != len(SPECIAL_TOKENS):
        raise TokenizerExportError(f"{model_name}'s tokenizer has extra special tokens")
    return tok


def _ranges(codepoints: list[int]) -> str:
    """Sorted code points as the body of a character class (``\\x{..}-\\x{..}`` runs)."""
    parts, start = [], None
    for i, cp in enumerate(codepoints):
        if start is None:
            start = cp
        if i + 1 == len(codepoints) or codepoints[i + 1] != cp + 1:
            parts.append(f"\\x{{{start:X}}}" if start == cp else f"\\x{{{start:X}}}-\\x{{{cp:X}}}")
            start = None
    return "".join(parts)


#: Every code point a Python string can hold (no surrogates), in order.
_CODEPOINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]


def _classify(universe: str) -> dict[str, list[int]]:
    """Every code point by the class of open_clip's pattern (under IGNORECASE) that takes it."""

    def members(pattern: str) -> list[int]:
        return [_CODEPOINTS[m.start()] for m in regex.finditer(pattern, universe, regex.IGNORECASE)]

    return {
        "letter": members(r"[\p{L}]"),
        "number": members(r"[\p{N}]"),
        "other": members(r"[^\s\p{L}\p{N}]"),
    }


def _case_variants(char: str, by_fold: dict[str, set[str]]) -> str:
    """``char`` as a class of every character ``regex`` matches it with under IGNORECASE
    (candidates: characters sharing its case fold or its lower case)."""
    candidates = by_fold.get(char.casefold(), set()) | by_fold.get(char.lower(), set())
    matching = sorted(
        ord(c)
        for c in candidates | {char}
        if regex.fullmatch(regex.escape(char), c, regex.IGNORECASE)
    )
    return f"[{_ranges(matching)}]"


def split_pattern() -> str:
    """open_clip's pre-tokenization pattern with every class and case variant explicit."""
    universe = "".join(map(chr, _CODEPOINTS))
    classes = _classify(universe)
    by_fold: dict[str, set[str]] = {}
    for c in universe:
        by_fold.setdefault(c.casefold(), set()).add(c)
        by_fold.setdefault(c.lower(), set()).add(c)

    def literal(text: str) -> str:
        return "".join(_case_variants(c, by_fold) if c.isalpha() else regex.escape(c) for c in text)

    alternatives = [literal(t) for t in SPECIAL_TOKENS + CONTRACTIONS]
    alternatives += [
        f"[{_ranges(classes['letter'])}]+",
        f"[{_ranges(classes['number'])}]",
        f"[{_ranges(classes['other'])}]+",
    ]
    return "|".join(alternatives)


def build_tokenizer(ref: SimpleTokenizer, context_length: int) -> Tokenizer:
    """A ``tokenizers`` Tokenizer equal to ``ref`` on cleaned text, with SOT/EOT, truncation
    keeping EOT and zero padding to ``context_length``."""
    # open_clip's merges in rank order (the order SimpleTokenizer applies them in).
    merges = sorted(ref.bpe_ranks, key=ref.bpe_ranks.__getitem__)
    bpe = models.BPE(vocab=dict(ref.encoder), merges=merges, end_of_word_suffix="</w>")
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern()), behavior="removed", invert=True),
            # The same byte -> unicode table as open_clip's bytes_to_unicode (GPT-2's).
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # A piece that is exactly a special token maps to its id (the runtime routes texts
    # holding one through the split first, as open_clip's pattern decides).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    sot, eot = ref.sot_token_id, ref.eot_token_id
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[0]} $A {SPECIAL_TOKENS[1]}",
        special_tokens=[(SPECIAL_TOKENS[0], sot), (SPECIAL_TOKENS[1], eot)],
    )
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=0, pad_token=ref.decoder[0])
    return tok


def write_tokenizer(model_name: str, context_length: int, out_dir: Path) -> tuple[Path, dict]:
    """Write ``out_dir/tokenizer.json``; return its path and the spec the runtime needs."""
    ref = reference_tokenizer(model_name)
    path = out_dir / TOKENIZER_FILE
    build_tokenizer(ref, context_length).save(str(path))
    spec = {
        "context_length": context_length,
        "vocab_size": ref.vocab_size,
        "sot_token_id": ref.sot_token_id,
        "eot_token_id": ref.eot_token_id,
        "special_tokens": list(SPECIAL_TOKENS),
        "clean": "lower",
        "library": "tokenizers",
    }
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path, spec
