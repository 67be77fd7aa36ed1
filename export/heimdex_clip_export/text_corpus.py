"""The texts the export gates the text tower on: search-style captions plus hostile inputs
(empty, whitespace, HTML, mojibake, CJK, emoji, far past 77 tokens)."""

from __future__ import annotations

import itertools

SUBJECTS = (
    "a cat",
    "a dog",
    "an astronaut",
    "a rocket",
    "a motorcycle",
    "a cup of coffee",
    "a wall clock",
    "old coins",
    "a brick wall",
    "the moon",
    "a man with a camera",
    "a red car",
)
TEMPLATES = (
    "a photo of {}",
    "{} at night",
    "a blurry close-up of {}",
    "{} in the sunset over the sea",
    "a video frame showing {} and people walking by",
)
HOSTILE = (
    "",
    "   \t\n ",
    "Hello, World!!!",
    "3.14159 and 1,000,000 and the 42nd street",
    "café naïve résumé Ångström",
    "e\u0301 a\u0308 combining marks",
    "東京タワーの夜景",
    "ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ １２３",
    "👍🏽 👩🏿‍🚀 🏳️‍🌈 emoji",
    "&amp;lt;b&amp;gt; Tom &amp; Jerry &quot;quoted&quot;",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "https://example.com/a/b?q=1&x=2#frag",
    "tabs\tand\nnewlines\r\nin a caption",
    "a very long caption " * 40,
    "<start_of_text> literal special tokens <end_of_text>",
)


def gate_corpus() -> list[str]:
    """Every template with every subject, then the hostile texts (75 texts: the PyTorch
    reference runs all 77 positions of each, the export's largest text cost)."""
    captions = [t.format(s) for t, s in itertools.product(TEMPLATES, SUBJECTS)]
    return captions + list(HOSTILE)
