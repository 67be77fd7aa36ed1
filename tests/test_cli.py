"""heimdex-clip embed / info on the real artifact."""

from __future__ import annotations

import json

from heimdex_clip.cli import main


def test_info_reports_manifest_session_and_cpu_features(artifact_dir, capsys):
    assert main(["--model-dir", str(artifact_dir), "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["name"] == "ViT-B-32" and info["weights"].startswith("RANDOM INIT")
    assert info["session"]["providers"] == ["CPUExecutionProvider"]
    assert info["session"]["intra_op_threads"] >= 1
    assert set(info["cpu"]["flags"]) >= {"avx2", "avx512_vnni", "amx_int8"}
    assert info["parity"]["int8_vs_fp32"]["mean_cosine"] >= 0.995
    assert main(["--model-dir", str(artifact_dir), "info"]) == 0
    text = capsys.readouterr().out
    assert "flags:" in text and "threads=" in text and "INT8 vs fp32" in text


def test_info_without_an_artifact_says_why(tmp_path, capsys):
    assert main(["--model-dir", str(tmp_path), "info"]) == 2
    assert "NOT LOADED" in capsys.readouterr().out


def test_embed_reports_each_file_and_fails_on_a_bad_one(artifact_dir, photos, tmp_path,
                                                        capsys):
    good = tmp_path / "good.jpg"
    photos[0][1].save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert main(["--model-dir", str(artifact_dir), "embed", str(good), str(bad), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["ok"] and rows[0]["dim"] == 512 and abs(rows[0]["norm"] - 1) < 1e-3
    assert rows[0]["time_ms"] > 0
    assert not rows[1]["ok"] and "cannot identify" in rows[1]["error"]
    assert main(["--model-dir", str(artifact_dir), "embed", str(good), "--json",
                 "--vectors"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["embedding"]) == 512
