"""CLIP_SERVE_* settings: parsed and checked at start-up, flags over the environment, and
not reported as unknown CLIP_* settings by the runtime's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from heimdex_clip import ClipConfig, ConfigError
from heimdex_clip.serve.settings import ServeSettings


def test_environment_then_flags():
    env = {
        "CLIP_SERVE_PORT": "9000",
        "CLIP_SERVE_HOST": "0.0.0.0",
        "CLIP_SERVE_MEDIA_ROOT": "/srv/frames",
        "CLIP_SERVE_BATCH_WAIT_MS": "2.5",
        "CLIP_SERVE_MAX_QUEUE": "",
    }
    settings = ServeSettings.from_env(env, port=9001, host=None)
    assert (
        settings.port,
        settings.host,
        settings.media_root,
        settings.batch_wait_ms,
        settings.max_queue,
    ) == (9001, "0.0.0.0", Path("/srv/frames"), 2.5, 64)
    assert ServeSettings.from_env({}) == ServeSettings()
    assert ClipConfig.from_env({**env, "CLIP_TIMEOUT": "1"}).unknown_keys == ("CLIP_TIMEOUT",)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CLIP_SERVE_PORT": "eighty"}, "CLIP_SERVE_PORT='eighty' is not a number"),
        ({"CLIP_SERVE_PORT": "70000"}, "CLIP_SERVE_PORT must be <= 65535"),
        ({"CLIP_SERVE_MAX_QUEUE": "0"}, "CLIP_SERVE_MAX_QUEUE must be >= 1"),
        ({"CLIP_SERVE_BATCH_WAIT_MS": "-1"}, "CLIP_SERVE_BATCH_WAIT_MS must be in"),
        ({"CLIP_SERVE_JWT_SECRET": "x" * 31}, "at least 32 bytes"),
    ],
)
def test_bad_values_are_refused_with_the_variable_named(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ServeSettings.from_env(env)


def test_the_secret_is_not_in_the_repr():
    assert "s3cret" not in repr(ServeSettings(jwt_secret="s3cret" * 8))
