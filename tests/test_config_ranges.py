"""Every numeric CLIP_* setting has an upper bound, checked wherever a config is built.

The ranges below are written out here, not read from the code: they are the documented
contract (docs/reliability.md), and the last test keeps that page's table equal to them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from heimdex_clip import ClipConfig, ClipEmbedder, ConfigError
from heimdex_clip.cli import main
from heimdex_clip.jobs import DeadlineRunner
from heimdex_clip.metadata import is_config_fault

REPO = Path(__file__).resolve().parents[1]
CPUS = len(os.sched_getaffinity(0))

# variable -> (field, lowest valid, highest valid, a value of the wrong type)
DOCUMENTED = {
    "CLIP_TIMEOUT_S": ("timeout_s", 1e-6, 3600.0, "2"),
    "CLIP_MAX_IMAGE_SIZE": ("max_image_size", 1, 8192, 224.0),
    "CLIP_CPU_THREADS": ("cpu_threads", 1, min(256, CPUS), 1.0),
    "CLIP_BATCH_SIZE": ("batch_size", 1, 256, True),
    "CLIP_MAX_IMAGE_PIXELS": ("max_image_pixels", 1, 500_000_000, 1e6),
    "CLIP_MAX_IMAGE_BYTES": ("max_image_bytes", 1, 2**31, "1000"),
    "CLIP_MAX_RESIZE_PIXELS": ("max_resize_pixels", 1, 100_000_000, "4000000"),
    "CLIP_EMBED_CACHE_SIZE": ("embed_cache_size", 0, 100_000, False),
}


def _above(value: float) -> float:
    return value + (1 if isinstance(value, int) else value * 1e-6)


def _below(value: float) -> float:
    return value - 1 if isinstance(value, int) else value / 2


@pytest.mark.parametrize("name", DOCUMENTED)
def test_each_setting_accepts_its_bounds_from_the_environment(name):
    field, low, high, _ = DOCUMENTED[name]
    assert getattr(ClipConfig.from_env({name: str(low)}), field) == low
    assert getattr(ClipConfig.from_env({name: str(high)}), field) == high


@pytest.mark.parametrize("name", DOCUMENTED)
def test_each_setting_refuses_values_past_its_bounds_everywhere(name):
    field, low, high, _ = DOCUMENTED[name]
    for bad in (_below(low), _above(high)):
        with pytest.raises(ConfigError, match=re.escape(name)):
            ClipConfig.from_env({name: str(bad)})
        with pytest.raises(ConfigError, match="outside its valid range"):
            ClipConfig(**{field: bad})
        with pytest.raises(ConfigError, match=field):
            ClipConfig().replace(**{field: bad})


@pytest.mark.parametrize("name", DOCUMENTED)
def test_each_setting_refuses_values_of_the_wrong_type(name):
    field, _, _, wrong = DOCUMENTED[name]
    with pytest.raises(ConfigError, match=r"must be an? (integer|number)"):
        ClipConfig(**{field: wrong})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CLIP_TIMEOUT_S": "1e10"}, "CLIP_TIMEOUT_S (timeout_s) is 10000000000.0, outside"),
        ({"CLIP_TIMEOUT_S": "inf"}, "outside its valid range 1e-06..3600 seconds"),
        ({"CLIP_CPU_THREADS": "1000"}, "CLIP_CPU_THREADS (cpu_threads) is 1000, outside"),
        ({"CLIP_BATCH_SIZE": "100000"}, "1..256 frames per model run"),
        ({"CLIP_EMBED_CACHE_SIZE": "9" * 30}, "outside its valid range 0..100000"),
        ({"CLIP_MAX_IMAGE_BYTES": "9" * 5000}, "is not an integer"),
    ],
)
def test_the_reported_examples_are_refused_at_build_time(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ClipConfig.from_env(env)


def test_more_threads_than_this_process_may_use_are_refused():
    with pytest.raises(ConfigError, match="the CPUs this process may use"):
        ClipConfig(cpu_threads=CPUS + 1)
    assert ClipConfig(cpu_threads=CPUS).cpu_threads == CPUS
    assert ClipConfig(cpu_threads=None).cpu_threads is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("enabled", "yes", "must be a bool"),
        ("normalize", 1, "must be a bool"),
        ("memory_arena", None, "must be a bool"),
        ("device", "tpu", "must be one of cpu, cuda"),
        ("precision", "INT8", "must be one of int8, fp32"),
        ("provider", "gpu", "must be one of auto, cpu, openvino"),
        ("model_name", "", "non-empty string"),
        ("pretrained", "x" * 5000, "at most 4096 characters"),
        ("pretrained", "open\x00ai", "without NUL"),
        ("image_formats", frozenset(), "at least one image format"),
        ("image_formats", frozenset({"NOPE"}), "Pillow reads no format named NOPE"),
        ("cache_dir", 3, "must be a path"),
    ],
)
def test_other_fields_are_checked_in_code_too(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ClipConfig(**{field: value})


def test_plain_paths_and_format_sets_are_taken_in_canonical_form(tmp_path):
    cfg = ClipConfig(
        model_dir=str(tmp_path), cache_dir=str(tmp_path), image_formats={"jpeg", "png"}
    )
    assert cfg.model_dir == tmp_path and cfg.cache_dir == tmp_path
    assert cfg.image_formats == frozenset({"JPEG", "PNG"})
    assert cfg == ClipConfig(
        model_dir=tmp_path, cache_dir=tmp_path, image_formats=frozenset({"JPEG", "PNG"})
    )


def test_the_cli_refuses_a_bad_setting_before_touching_any_frame(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CLIP_TIMEOUT_S", "1e10")
    assert main(["embed", str(tmp_path / "never-read.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CLIP_TIMEOUT_S (timeout_s) is 10000000000.0"), err
    assert "never-read" not in err


def test_the_reference_page_lists_every_range():
    page = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    for name, (_, low, high, _) in DOCUMENTED.items():
        high_text = (
            "256"
            if name == "CLIP_CPU_THREADS"
            else (f"{high:g}" if isinstance(high, float) else str(high))
        )
        low_text = f"{low:g}" if isinstance(low, float) else str(low)
        row = re.search(rf"^\| `{name}` \|[^\n]*", page, re.M)
        assert row is not None, f"{name} has no row in docs/reliability.md"
        assert f"{low_text}..{high_text}" in row.group(0).replace(",", ""), row.group(0)


@pytest.mark.parametrize("timeout", [1e10, math.inf, math.nan, -1.0])
def test_a_deadline_no_wait_can_take_is_a_config_error_not_a_job_failure(timeout):
    runner = DeadlineRunner()
    with pytest.raises(ConfigError, match="cannot be waited for"):
        runner.run(lambda job: 1, timeout)
    assert runner.live_jobs == 0  # refused before any thread started


def test_a_config_fault_that_surfaces_during_a_run_is_labelled_as_such(artifact_dir, photos):
    """Defence in depth: were a bad value to get past the checks (here forced into a frozen
    config after it was built), the worker path names it ConfigError, which backfill must
    not count against the frame (docs/reliability.md)."""
    config = ClipConfig(pretrained="none", model_dir=artifact_dir)
    embedder = ClipEmbedder(config=config).load()
    object.__setattr__(config, "timeout_s", 1e10)
    for result in (embedder.embed_frame(photos[0][1]), embedder.embed_text("a dog")):
        assert result.embedding is None
        assert result.error.startswith("ConfigError: "), result.error
        assert is_config_fault(result.error)
    assert not is_config_fault("Timeout after 2.0s") and not is_config_fault(None)
