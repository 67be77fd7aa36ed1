"""Partial copies of the test artifact for tests that damage, edit or install one.

A whole copy is ~0.8 GB (the fp32 graphs are kept for parity tests); a copy of the files
the runtime loads by default is ~150 MB. Tests copy only what they use, so the suite's
temporary files stay small on a machine whose disk is nearly full.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

# What an INT8 embedder on the CPU provider reads: both towers and the tokenizer.
RUNTIME_FILES = frozenset({"visual.int8", "text.int8", "tokenizer"})


def copy_artifact(artifact_dir: Path, dest: Path, keep: Iterable[str] = RUNTIME_FILES) -> Path:
    """Copy the manifest's ``keep`` files into ``dest`` with a manifest listing only them.

    The manifest is rewritten (not its hashes) so that the copy is a consistent artifact
    that simply lacks the other graphs, as an export without ``--keep-fp32`` would.
    """
    keep = set(keep)
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    missing = keep - set(manifest["files"])
    if missing:
        raise KeyError(f"the test artifact has no {sorted(missing)}")
    dest.mkdir(parents=True)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k in keep}
    for entry in manifest["files"].values():
        shutil.copy(artifact_dir / entry["path"], dest / entry["path"])
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest
