"""ClipConfig: every CLIP_* setting of the design, with its defaults and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from heimdex_clip import ClipConfig, ConfigError


def test_defaults_are_the_design_documents():
    cfg = ClipConfig.from_env({})
    assert cfg.enabled is False
    assert cfg.model_name == "ViT-B-32"
    assert cfg.pretrained == "openai"
    assert cfg.device == "cpu"
    assert cfg.normalize is True
    assert cfg.timeout_s == 2.0
    assert cfg.max_image_size == 224
    assert cfg.cpu_threads is None
    assert cfg.cache_dir == Path("/tmp/clip_cache")
    assert cfg.debug_log is False
    assert cfg.model_dir is None
    assert cfg.fast_decode is False


def test_every_variable_is_read():
    cfg = ClipConfig.from_env(
        {
            "CLIP_ENABLED": "true",
            "CLIP_MODEL_NAME": "ViT-B-16",
            "CLIP_PRETRAINED": "none",
            "CLIP_DEVICE": "CUDA",
            "CLIP_NORMALIZE": "false",
            "CLIP_TIMEOUT_S": "0.5",
            "CLIP_MAX_IMAGE_SIZE": "448",
            "CLIP_CPU_THREADS": "1",
            "CLIP_CACHE_DIR": "/var/cache/c",
            "CLIP_DEBUG_LOG": "1",
            "CLIP_MODEL_DIR": "/models",
            "CLIP_BATCH_SIZE": "8",
            "CLIP_FAST_DECODE": "yes",
            "CLIP_MAX_IMAGE_PIXELS": "1000",
            "CLIP_PRECISION": "fp32",
            "CLIP_MEMORY_ARENA": "off",
            "CLIP_EMBED_CACHE_SIZE": "0",
        }
    )
    assert (cfg.enabled, cfg.model_name, cfg.pretrained, cfg.device) == (
        True,
        "ViT-B-16",
        "none",
        "cuda",
    )
    assert (cfg.normalize, cfg.timeout_s, cfg.max_image_size, cfg.cpu_threads) == (
        False,
        0.5,
        448,
        1,
    )
    assert (cfg.cache_dir, cfg.debug_log, cfg.model_dir) == (
        Path("/var/cache/c"),
        True,
        Path("/models"),
    )
    assert (cfg.batch_size, cfg.fast_decode, cfg.max_image_pixels) == (8, True, 1000)
    assert (cfg.precision, cfg.memory_arena, cfg.embed_cache_size) == ("fp32", False, 0)
    assert cfg.unknown_keys == ()


@pytest.mark.parametrize("value", ["null", "", "None"])
def test_cpu_threads_null_means_physical_cores(value):
    assert ClipConfig.from_env({"CLIP_CPU_THREADS": value}).cpu_threads is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CLIP_ENABLED", "maybe", "not a boolean"),
        ("CLIP_DEVICE", "tpu", "'cpu' or 'cuda'"),
        ("CLIP_TIMEOUT_S", "0", "outside its valid range 1e-06..3600"),
        ("CLIP_TIMEOUT_S", "-1", "outside its valid range"),
        ("CLIP_TIMEOUT_S", "nan", "outside its valid range"),
        ("CLIP_TIMEOUT_S", "soon", "not a number"),
        ("CLIP_MAX_IMAGE_SIZE", "0", "outside its valid range 1..8192"),
        ("CLIP_MAX_IMAGE_SIZE", "big", "not an integer"),
        ("CLIP_CPU_THREADS", "0", "outside its valid range 1.."),
        ("CLIP_BATCH_SIZE", "-4", "outside its valid range 1..256"),
        ("CLIP_PRECISION", "int4", "'int8' or 'fp32'"),
        ("CLIP_MODEL_NAME", "  ", "must be a non-empty string"),
    ],
)
def test_invalid_values_are_clear_errors_naming_the_variable(name, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        ClipConfig.from_env({name: value})
    assert name in str(info.value)


def test_unknown_clip_variables_are_reported_not_silently_dropped():
    cfg = ClipConfig.from_env({"CLIP_TIMEOUT": "3", "CLIP_ENABLED": "true", "PATH": "/bin"})
    assert cfg.unknown_keys == ("CLIP_TIMEOUT",)


def test_the_settings_table_covers_every_field_and_only_clip_names():
    from dataclasses import fields

    from heimdex_clip.config import SETTINGS

    settable = {f.name for f in fields(ClipConfig)} - {"unknown_keys"}
    assert sorted(field for field, _ in SETTINGS.values()) == sorted(settable)
    assert all(
        name == f"CLIP_{field.upper()}"
        or (name, field) in {("CLIP_TIMEOUT_S", "timeout_s"), ("CLIP_CPU_THREADS", "cpu_threads")}
        for name, (field, _) in SETTINGS.items()
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CLIP_MAX_IMAGE_BYTES", "1000", 1000),
        ("CLIP_MAX_RESIZE_PIXELS", "50000", 50000),
        ("CLIP_IMAGE_FORMATS", "png,Jpeg", frozenset({"PNG", "JPEG"})),
    ],
)
def test_the_input_limits_are_settings(name, value, expected):
    from heimdex_clip.config import SETTINGS

    assert getattr(ClipConfig.from_env({name: value}), SETTINGS[name][0]) == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CLIP_MAX_IMAGE_BYTES", "0", "outside its valid range 1..2147483648"),
        ("CLIP_MAX_RESIZE_PIXELS", "lots", "not an integer"),
        ("CLIP_IMAGE_FORMATS", " , ", "at least one"),
    ],
)
def test_the_input_limits_are_validated(name, value, message):
    with pytest.raises(ConfigError, match=message):
        ClipConfig.from_env({name: value})
