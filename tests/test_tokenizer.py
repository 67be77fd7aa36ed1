"""The torch-free tokenizer against open_clip.tokenize, token for token.

The reference is the real ``open_clip.tokenize`` (export extra); the tokenizer under test
is the artifact's shipped ``tokenizer.json`` run by Hugging Face ``tokenizers``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from heimdex_clip.errors import TextError
from heimdex_clip.tokenizer import MAX_TEXT_CHARS, ClipTokenizer, clean_text

open_clip = pytest.importorskip("open_clip")

SOT, EOT, CONTEXT = 49406, 49407, 77

CORPUS = {
    "plain English": ["a photo of a cat", "A Red Car At Night", "sunset over the sea"],
    "punctuation": [
        "Hello, World!!! ...",
        "what?!? (yes) [no] {maybe} -- a/b\\c",
        "it's I'M we'll they'd you've",
        "don't 'quote' \"double\" `tick`",
    ],
    "numbers": ["3.14159", "1,000,000 dollars", "the 42nd street", "2024-11-25 17:45", "½ ² Ⅻ ٣ ๕"],
    "accents": ["café naïve résumé", "Ångström Øre Ñandú", "İstanbul ǅ ß ﬁ"],
    "combining marks": ["e\u0301 a\u0308 o\u0302", "n\u0303o\u0328\u0301", "\u0345x"],
    "CJK": ["東京タワーの夜景", "北京的秋天", "서울의 밤거리", "ひらがな カタカナ"],
    "full-width": ["ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ", "１２３４５", "ｈｅｌｌｏ，ｗｏｒｌｄ！"],
    "emoji": ["👍🏽 thumbs up", "👩🏿‍🚀 astronaut", "🏳️‍🌈 flag", "🧑🏻‍🤝‍🧑🏿 😀😃😄", "❤️ heart ♥"],
    "HTML entities": [
        "&amp;lt;b&amp;gt;",
        "Tom &amp; Jerry",
        "&quot;quoted&quot; &#39;x&#39;",
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "&nbsp;&copy;&eacute;",
    ],
    "mojibake": [
        "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
        "schÃ¶n",
        "cafÃ©",
        "â€œquotedâ€\x9d",
    ],
    "URLs": [
        "https://example.com/a/b?q=1&x=2#frag",
        "www.heimdex.io/search?q=red+car",
        "mailto:someone@example.org",
    ],
    "whitespace": [
        "tabs\tand\nnewlines\r\n",
        "\u00a0non-breaking\u2003em space\u3000",
        "  leading and trailing  ",
    ],
    "empty": [""],
    "whitespace only": [" ", "   \t\n ", "\u3000\u00a0"],
    "far past 77 tokens": [
        "a very long caption " * 40,
        "x" * 1000,
        "東京" * 300,
        "👍🏽" * 100,
        "<end_of_text>" * 30,
    ],
    "special-token strings": [
        "<start_of_text> hi <end_of_text>",
        "a<start_of_text>b",
        "!!<end_of_text>x",
        "<START_OF_TEXT>",
        "<ſtart_of_text>",
    ],
    "control characters": ["a\x00b\x07c", "\x1b[31mred\x1b[0m", "zero\u200bwidth\u200d"],
}


@pytest.fixture(scope="module")
def tokenizer(artifact_dir) -> ClipTokenizer:
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    spec = manifest["text"]["tokenizer"]
    path = artifact_dir / manifest["files"]["tokenizer"]["path"]
    return ClipTokenizer(
        path.read_text(encoding="utf-8"), spec["context_length"], spec["special_tokens"]
    )


def reference(texts: list[str]) -> np.ndarray:
    return open_clip.tokenize(texts).numpy()


@pytest.mark.parity
@pytest.mark.parametrize("category", sorted(CORPUS))
def test_matches_open_clip_token_for_token(tokenizer, category):
    texts = CORPUS[category]
    ours, ref = tokenizer(texts), reference(texts)
    assert ours.dtype == np.int64 and ours.shape == (len(texts), CONTEXT)
    for text, row, expected in zip(texts, ours, ref, strict=True):
        assert row.tolist() == expected.tolist(), repr(text)


@pytest.mark.parity
def test_matches_open_clip_on_random_unicode(tokenizer):
    """Seeded random strings over scripts, marks, symbols, emoji and whitespace."""
    rng = np.random.default_rng(1234)
    blocks = [
        (0x20, 0x7F),
        (0xA0, 0x250),
        (0x300, 0x370),
        (0x370, 0x530),
        (0x590, 0x700),
        (0x900, 0x980),
        (0x3040, 0x3100),
        (0x4E00, 0x4F00),
        (0xAC00, 0xAD00),
        (0xFF00, 0xFFEF),
        (0x1F300, 0x1FAFF),
        (0x2000, 0x2070),
        (0x10000, 0x10FFFF),
    ]
    texts = []
    for _ in range(1500):
        chosen = [blocks[i] for i in rng.choice(len(blocks), size=int(rng.integers(1, 4)))]
        cps = [
            int(rng.integers(*chosen[int(rng.integers(len(chosen)))]))
            for _ in range(int(rng.integers(1, 40)))
        ]
        texts.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
    ours, ref = tokenizer(texts), reference(texts)
    bad = [texts[i] for i in np.flatnonzero((ours != ref).any(axis=1))]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]!r}"


def test_layout_sot_eot_padding(tokenizer):
    empty, short, long = tokenizer(["", "a photo of a cat", "word " * 200])
    assert empty.tolist() == [SOT, EOT] + [0] * (CONTEXT - 2)
    assert short[0] == SOT and (short != 0).sum() == 2 + 5 and EOT in short.tolist()
    assert short[(short != 0).sum() :].tolist() == [0] * (CONTEXT - 7)
    # Truncation keeps start and end of text: 75 text tokens between them, no padding.
    assert long[0] == SOT and long[-1] == EOT and (long != 0).all()
    assert EOT not in long[:-1].tolist()


def test_cleaning_is_open_clips(tokenizer):
    assert clean_text("  Tom &amp;amp; JERRY\t\n ") == "tom & jerry"
    assert clean_text("schÃ¶n") == "schön"
    # Same ids whatever the case and spacing: cleaning happens before the BPE.
    assert tokenizer(["A  RED\tcar"]).tolist() == tokenizer(["a red car"]).tolist()


@pytest.mark.parametrize("bad", ["a string", b"bytes", 42, None])
def test_rejects_anything_but_a_sequence_of_str(tokenizer, bad):
    with pytest.raises(TextError, match="sequence of texts"):
        tokenizer(bad)


def test_rejects_non_string_items_and_huge_texts(tokenizer):
    with pytest.raises(TextError, match="text 1 is int"):
        tokenizer(["ok", 3])
    with pytest.raises(TextError, match="limit"):
        tokenizer(["x" * (MAX_TEXT_CHARS + 1)])
    assert tokenizer([]).shape == (0, CONTEXT)


def test_tokenizer_file_must_pad_to_the_context(tokenizer, artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    text = (artifact_dir / manifest["files"]["tokenizer"]["path"]).read_text(encoding="utf-8")
    with pytest.raises(TextError, match="pad to 64"):
        ClipTokenizer(text, 64, ["<start_of_text>", "<end_of_text>"])
