"""heimdex-clip embed / info on the real artifact."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_embedder import EXECUTION_PROVIDERS

from heimdex_clip.cli import main


def _cpuinfo_flags() -> set[str]:
    """The CPU's flags as the kernel lists them (read here, not through heimdex_clip)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_info_reports_manifest_session_and_cpu_features(artifact_dir, capsys):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    assert main(["--model-dir", str(artifact_dir), "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["name"] == manifest["model"]["name"]
    assert info["model"]["embed_dim"] == manifest["model"]["embed_dim"]
    assert info["weights"].startswith("RANDOM INIT")  # the test artifact is a random init
    # auto runs cpu, or OpenVINO where its plugin offers this CPU (Intel); cpu is always last.
    assert info["session"]["providers"][0] == EXECUTION_PROVIDERS[info["session"]["provider"]]
    assert info["session"]["providers"][-1] == "CPUExecutionProvider"
    assert 1 <= info["session"]["intra_op_threads"] <= os.cpu_count()
    # Each reported flag is on exactly when the kernel lists it for this CPU.
    cpu_flags = _cpuinfo_flags()
    reported = info["cpu"]["flags"]
    assert reported and all(on == (flag in cpu_flags) for flag, on in reported.items())
    assert info["parity"]["int8_vs_fp32"] == manifest["parity"]["int8_vs_fp32"]
    assert main(["--model-dir", str(artifact_dir), "info"]) == 0
    text = capsys.readouterr().out
    flags_line = next(line for line in text.splitlines() if "flags:" in line)
    assert {f for f, on in reported.items() if on} == set(
        flags_line.split("flags:", 1)[1].replace(",", " ").split()
    )
    mean = manifest["parity"]["int8_vs_fp32"]["mean_cosine"]
    assert (
        f"INT8 vs fp32 (export-time, {manifest['parity']['int8_vs_fp32']['images']} images)" in text
        and f"mean cos {mean:.5f}" in text
    )
    assert f"threads={info['session']['intra_op_threads']}" in text


def test_info_without_an_artifact_says_why(tmp_path, capsys):
    assert main(["--model-dir", str(tmp_path), "info"]) == 2
    assert "NOT LOADED" in capsys.readouterr().out


def test_embed_reports_each_file_and_fails_on_a_bad_one(artifact_dir, photos, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    photos[0][1].save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert main(["--model-dir", str(artifact_dir), "embed", str(good), str(bad), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["ok"] and rows[0]["dim"] == 512 and abs(rows[0]["norm"] - 1) < 1e-3
    assert rows[0]["time_ms"] > 0
    assert not rows[1]["ok"] and "cannot identify" in rows[1]["error"]
    assert main(["--model-dir", str(artifact_dir), "embed", str(good), "--json", "--vectors"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["embedding"]) == 512
