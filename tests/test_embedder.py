"""ClipEmbedder on the real exported artifact and real ONNX Runtime sessions."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from artifact_copies import copy_artifact
from hostile import BlockingImage
from PIL import Image

from heimdex_clip import (
    ArtifactError,
    ClipConfig,
    ClipEmbedder,
    ConfigError,
    ImageError,
    get_embedder,
    reset_embedder,
)
from heimdex_clip.jobs import DeadlineRunner, JobTimeout
from heimdex_clip.providers import available_providers
from heimdex_clip.worker_api import WorkerEmbedder

# The design document's ten fields, plus the artifact that made the vector (provenance).
METADATA_FIELDS = {
    "model_name",
    "pretrained",
    "embed_dim",
    "normalized",
    "device",
    "frame_path",
    "frame_quality",
    "inference_time_ms",
    "created_at",
    "error",
    "artifact_id",
    "provider",
}


#: The ONNX Runtime execution provider behind each CLIP_PROVIDER value.
EXECUTION_PROVIDERS = {"cpu": "CPUExecutionProvider", "openvino": "OpenVINOExecutionProvider"}


def make_config(artifact_dir: Path, **changes) -> ClipConfig:
    return ClipConfig(enabled=True, pretrained="none", model_dir=artifact_dir, **changes)


@pytest.fixture(scope="module")
def embedder(artifact_dir) -> ClipEmbedder:
    return ClipEmbedder(config=make_config(artifact_dir, embed_cache_size=0)).load()


@pytest.fixture(scope="module")
def jpeg_files(photos, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("frames")
    paths = []
    for name, image in photos[:8]:
        path = folder / f"{name}.jpg"
        image.save(path, quality=92)
        paths.append(path)
    return paths


class TestClipEmbedderDisabled:
    def test_disabled_returns_none(self):
        assert get_embedder(ClipConfig(enabled=False)) is None


class TestClipEmbedderSingleton:
    def test_singleton_returns_same_instance(self, artifact_dir):
        reset_embedder()
        cfg = make_config(artifact_dir)
        try:
            with ThreadPoolExecutor(8) as pool:
                instances = list(pool.map(lambda _: get_embedder(cfg), range(16)))
            assert all(i is instances[0] for i in instances)
            assert isinstance(instances[0], ClipEmbedder)
        finally:
            reset_embedder()

    def test_model_is_loaded_lazily(self, artifact_dir):
        lazy = ClipEmbedder(config=make_config(artifact_dir))
        assert not lazy.is_loaded and lazy.load_time_ms is None
        lazy.embed_frame(Image.new("RGB", (64, 64)))
        assert lazy.is_loaded and lazy.load_time_ms > 0

    def test_model_properties_before_load_warn_and_name_load(self, artifact_dir):
        manifest = json.loads((artifact_dir / "manifest.json").read_text())
        lazy = ClipEmbedder(config=make_config(artifact_dir))
        # Cheap values never load.
        assert (lazy.is_loaded, lazy.load_time_ms, lazy.active_jobs) == (False, None, 0)
        # The deprecation path: the property still loads, and says to call load() first.
        with pytest.warns(DeprecationWarning, match=r"embed_dim was read before load\(\)"):
            assert lazy.embed_dim == manifest["model"]["embed_dim"]
        assert lazy.is_loaded
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # loaded: no property warns any more
            assert lazy.manifest.model.name == manifest["model"]["name"]
            assert lazy.artifact_dir.resolve() == artifact_dir.resolve()
            assert lazy.artifact_id == lazy.manifest.artifact_id and lazy.has_text_tower
            info = lazy.session_info  # auto: cpu, or OpenVINO where its plugin runs (Intel)
            assert info.providers[0] == EXECUTION_PROVIDERS[info.provider]
        for name in ("manifest", "artifact_id", "session_info", "artifact_dir", "has_text_tower"):
            with pytest.warns(DeprecationWarning, match=f"{name} was read before load"):
                getattr(ClipEmbedder(config=make_config(artifact_dir)), name)

    def test_the_two_api_styles_are_two_objects(self, artifact_dir):
        emb = ClipEmbedder(config=make_config(artifact_dir, embed_cache_size=0)).load()
        assert isinstance(emb.worker, WorkerEmbedder)
        gray = Image.new("RGB", (64, 64), (120, 120, 120))
        # Strict raises on bad input; the worker answers with the reason, on the same model.
        with pytest.raises(ImageError):
            emb.embed_images([b"not an image"])
        bad = emb.worker.embed_frame(b"not an image")
        assert bad.embedding is None and "ImageError" in bad.metadata["error"]
        strict = emb.embed_images([gray])[0]
        assert np.allclose(emb.worker.embed_frame(gray).embedding, strict, atol=1e-6)
        assert np.array_equal(
            emb.embed_frame(gray).embedding, emb.worker.embed_frame(gray).embedding
        )

    def test_a_different_config_is_refused_not_silently_ignored(self, artifact_dir):
        reset_embedder()
        try:
            first = get_embedder(make_config(artifact_dir))
            assert get_embedder(make_config(artifact_dir)) is first  # equal config: same one
            with pytest.raises(ConfigError, match="reset_embedder"):
                get_embedder(make_config(artifact_dir, timeout_s=9.0))
        finally:
            reset_embedder()

    def test_reset_does_not_break_a_holder_of_the_old_instance(self, artifact_dir, photos):
        reset_embedder()
        held = get_embedder(make_config(artifact_dir))
        assert held.embed_frame(photos[0][1]).ok
        reset_embedder()
        assert held.embed_frame(photos[1][1]).ok  # still usable by whoever holds it
        assert get_embedder(make_config(artifact_dir)) is not held
        reset_embedder()


class TestClipEmbedderModelLoading:
    def test_model_loading_success(self, artifact_dir, caplog):
        caplog.set_level(logging.INFO, logger="heimdex_clip")
        # The CPU provider named: auto may pick OpenVINO on an Intel CPU (test_providers.py).
        emb = ClipEmbedder(config=make_config(artifact_dir, cpu_threads=1, provider="cpu")).load()
        assert emb.embed_dim == 512
        assert emb.manifest.model.name == "ViT-B-32"
        assert emb.session_info.intra_op_threads == 1
        assert emb.session_info.providers == ["CPUExecutionProvider"]
        text = caplog.text
        assert "Loading CLIP model: ViT-B-32 (pretrained=none, device=cpu)" in text
        assert "CLIP model loaded successfully: ViT-B-32 (embed_dim=512, device=cpu" in text
        assert "intra_op_threads=1" in text
        assert "RANDOM INITIALISATION" in text  # loud warning for a test artifact

    def test_missing_artifact_gives_null_embedding_with_error(self, tmp_path, photos):
        emb = ClipEmbedder(config=make_config(tmp_path / "nowhere"))
        result = emb.embed_frame(photos[0][1], frame_path="f.jpg")
        assert result.embedding is None
        assert "Model load failed" in result.error and "no model artifact" in result.error
        with pytest.raises(ArtifactError, match="make export-model"):
            emb.load()

    @pytest.mark.parametrize("damage", ["flip_byte", "corrupt_header", "truncate", "delete"])
    def test_tampered_model_file_is_refused(self, artifact_dir, tmp_path, photos, damage):
        copy = copy_artifact(artifact_dir, tmp_path / "artifact")
        model = copy / "visual.int8.onnx"
        data = bytearray(model.read_bytes())
        if damage == "flip_byte":
            data[len(data) // 2] ^= 0xFF
            model.write_bytes(bytes(data))
        elif damage == "corrupt_header":  # unparsable: ORT fails too, the hash says why
            data[:64] = b"\x00" * 64
            model.write_bytes(bytes(data))
        elif damage == "truncate":
            model.write_bytes(bytes(data[:-10]))
        else:
            model.unlink()
        emb = ClipEmbedder(config=make_config(copy))
        result = emb.embed_frame(photos[0][1])
        assert result.embedding is None
        expected = {
            "flip_byte": "sha256 mismatch",
            "corrupt_header": "sha256 mismatch",
            "truncate": "truncated",
            "delete": "missing",
        }[damage]
        assert expected in result.error
        # The failure is remembered, not re-hashed for every frame, until reload().
        assert emb.embed_frame(photos[1][1]).error == result.error

    def test_fp32_precision_needs_the_fp32_file(self, artifact_dir, tmp_path):
        # An artifact exported without --keep-fp32: its manifest lists no fp32 graph.
        copy = copy_artifact(artifact_dir, tmp_path / "artifact")
        with pytest.raises(ArtifactError, match=r"no 'visual\.fp32' file"):
            ClipEmbedder(config=make_config(copy, precision="fp32")).load()

    def test_cuda_without_provider_falls_back_to_cpu_and_says_so(
        self, artifact_dir, caplog, photos
    ):
        caplog.set_level(logging.WARNING)
        emb = ClipEmbedder(config=make_config(artifact_dir, device="cuda"))
        result = emb.embed_frame(photos[0][1])
        assert result.ok and result.metadata["device"] == "cpu"
        assert "no CUDAExecutionProvider" in caplog.text


class TestClipEmbedderEmbeddingGeneration:
    def test_embedding_generation_success(self, embedder, jpeg_files, caplog):
        caplog.set_level(logging.INFO, logger="heimdex_clip")
        result = embedder.embed_frame(jpeg_files[0], frame_quality=0.82, scene=12)
        assert result.ok and result.error is None
        vec = result.embedding
        assert vec.shape == (512,) and vec.dtype == np.float32
        assert abs(np.linalg.norm(vec) - 1) < 1e-4
        md = result.metadata
        assert set(md) == METADATA_FIELDS
        assert md["model_name"] == "ViT-B-32" and md["pretrained"] == "none"
        assert md["embed_dim"] == 512 and md["normalized"] is True and md["device"] == "cpu"
        assert md["frame_path"] == str(jpeg_files[0])
        assert md["frame_quality"] == {"quality_score": 0.82}
        assert md["inference_time_ms"] > 0
        assert md["created_at"].endswith("Z")
        assert "Scene 12: Generating CLIP embedding from best frame" in caplog.text
        assert "Scene 12: CLIP embedding created (dim=512, time=" in caplog.text

    def test_debug_log_prints_norm_without_touching_logger_levels(
        self, artifact_dir, jpeg_files, caplog
    ):
        caplog.set_level(logging.INFO, logger="heimdex_clip")
        package_logger = logging.getLogger("heimdex_clip")
        level_before = package_logger.level
        quiet = ClipEmbedder(config=make_config(artifact_dir))
        quiet.embed_frame(jpeg_files[0])
        assert "norm=" not in caplog.text  # only at DEBUG without CLIP_DEBUG_LOG
        emb = ClipEmbedder(config=make_config(artifact_dir, debug_log=True))
        emb.embed_frame(jpeg_files[0])
        assert f"CLIP embedding created: {jpeg_files[0]}, dim=512" in caplog.text
        assert "norm=1.0000" in caplog.text
        assert package_logger.level == level_before

    def test_every_input_kind_gives_the_same_vector(self, embedder, jpeg_files):
        path = jpeg_files[1]
        pil = Image.open(path)
        pil.load()
        kinds = [str(path), path, path.read_bytes(), pil, np.asarray(pil.convert("RGB"))]
        vectors = embedder.embed_images(kinds)
        for v in vectors[1:]:
            np.testing.assert_allclose(v, vectors[0], atol=1e-6)

    def test_batch_equals_single_calls(self, embedder, jpeg_files):
        batched = embedder.embed_images(jpeg_files, batch_size=8)
        single = np.stack([embedder.embed_frame(p).embedding for p in jpeg_files])
        assert np.min(np.sum(batched * single, axis=1)) >= 0.999

    def test_different_images_give_different_vectors(self, embedder, jpeg_files):
        vectors = embedder.embed_images(jpeg_files[:4])
        sims = vectors @ vectors.T
        assert sims[np.triu_indices(4, 1)].max() < 0.999

    def test_normalize_false_returns_raw_features(self, artifact_dir, jpeg_files, embedder):
        raw_emb = ClipEmbedder(config=make_config(artifact_dir, normalize=False))
        raw = raw_emb.embed_images(jpeg_files[:2])
        unit = embedder.embed_images(jpeg_files[:2])
        assert np.all(np.abs(np.linalg.norm(raw, axis=1) - 1) > 1e-3)
        np.testing.assert_allclose(
            raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-5
        )
        assert raw_emb.embed_frame(jpeg_files[0]).metadata["normalized"] is False

    def test_preprocess_is_public_and_shaped(self, embedder, jpeg_files):
        pixels = embedder.preprocess(jpeg_files[:3])
        assert pixels.shape == (3, 3, 224, 224) and pixels.dtype == np.float32

    def test_fast_decode_runs_the_fast_geometry(self, artifact_dir, embedder, photos):
        """CLIP_FAST_DECODE reaches the preprocessor: a 1080p JPEG gets the DCT-scaled
        decode and the crop-only resize, and its vector stays next to the exact one."""
        from heimdex_clip.images import load_image
        from heimdex_clip.preprocess import Preprocessor

        buf = io.BytesIO()
        dict(photos)["astronaut"].convert("RGB").resize((1920, 1080)).save(buf, "JPEG")
        frame = buf.getvalue()
        fast = ClipEmbedder(config=make_config(artifact_dir, embed_cache_size=0, fast_decode=True))
        pre = Preprocessor(embedder.manifest.preprocess)
        drafted = load_image(frame, max_pixels=10**8, min_side_for_draft=224)
        assert np.array_equal(fast.preprocess([frame]), pre([drafted], fast=True))
        assert not np.array_equal(pre([drafted], fast=True), pre([drafted]))  # both in play
        cosine = float(fast.embed_frame(frame).embedding @ embedder.embed_frame(frame).embedding)
        assert cosine > 0.999


class TestGracefulDegradation:
    @pytest.mark.parametrize(
        ("make", "message"),
        [
            (lambda tmp: b"", "empty"),
            (lambda tmp: np.random.default_rng(0).bytes(5000), "cannot identify"),
            (lambda tmp: tmp / "missing.jpg", "does not exist"),
            (lambda tmp: tmp, "directory"),
            (lambda tmp: np.zeros((10, 10, 7), np.uint8), "shape"),
        ],
    )
    def test_bad_frame_gives_null_with_error_and_pipeline_goes_on(
        self, embedder, tmp_path, jpeg_files, make, message
    ):
        result = embedder.embed_frame(make(tmp_path), frame_path="bad.jpg", frame_quality=0.5)
        assert result.embedding is None
        assert message in result.error.lower() or message in result.error
        md = result.metadata
        assert set(md) == METADATA_FIELDS
        assert md["frame_quality"] is None and md["inference_time_ms"] is None
        assert embedder.embed_frame(jpeg_files[0]).ok

    def test_strict_path_raises(self, embedder, jpeg_files):
        with pytest.raises(ImageError):
            embedder.embed_images([jpeg_files[0], b"not an image"])

    def test_truncated_jpeg(self, embedder, jpeg_files):
        data = jpeg_files[0].read_bytes()
        result = embedder.embed_frame(data[: len(data) // 2])
        assert result.embedding is None and result.error

    def test_decompression_bomb_is_refused_quickly(self, embedder):
        buf = io.BytesIO()
        Image.new("1", (30000, 30000)).save(buf, format="PNG")
        started = time.perf_counter()
        result = embedder.embed_frame(buf.getvalue())
        assert result.embedding is None and "pixels" in result.error
        assert time.perf_counter() - started < embedder.config.timeout_s

    def test_slow_decoding_times_out_with_the_designs_message(
        self, artifact_dir, jpeg_files, embedder
    ):
        impatient = ClipEmbedder(
            config=make_config(artifact_dir, timeout_s=0.3, embed_cache_size=0)
        ).load()
        gate = threading.Event()
        slow = BlockingImage(gate)
        try:
            single = impatient.embed_frame(slow, frame_path="slow.jpg")
            assert single.embedding is None and single.error == "Timeout after 0.3s"
            assert single.metadata["inference_time_ms"] is None
            # In a batch the slow frame fails alone, with the same per-frame message.
            batch = impatient.embed_frames([jpeg_files[0], BlockingImage(gate), jpeg_files[1]])
            assert [r.ok for r in batch] == [True, False, True]
            assert batch[1].error == "Timeout after 0.3s"
            np.testing.assert_allclose(
                np.stack([batch[0].embedding, batch[2].embedding]),
                embedder.embed_images(jpeg_files[:2]),
                atol=1e-6,
            )
            assert impatient.active_jobs == 2  # the abandoned decodes are still blocked
        finally:
            gate.set()
        deadline = time.monotonic() + 10
        while impatient.active_jobs and time.monotonic() < deadline:
            time.sleep(0.01)
        assert impatient.active_jobs == 0  # abandoned work ended once it could

    def test_an_onnx_runtime_run_is_terminated_at_its_deadline(self, artifact_dir):
        """The deadline runner stops a model run in progress (RunOptions.terminate): a
        256-frame run needs seconds on any CPU, its 50 ms deadline stops it within moments.
        ONNX Runtime's CPU provider checks the flag between nodes; the OpenVINO EP runs the
        whole graph in one call and does not (next test)."""
        cpu = ClipEmbedder(config=make_config(artifact_dir, provider="cpu", embed_cache_size=0))
        times = _run_past_a_50ms_deadline(cpu._slot.load())
        assert times["stopped"] < times["whole_run"] / 2

    @pytest.mark.parametrize(
        "provider", [p for p, why_not in available_providers().items() if why_not is None]
    )
    def test_the_caller_gets_its_timeout_at_the_deadline_on_every_provider(
        self, artifact_dir, provider
    ):
        """Whether or not the provider can stop a run in progress (the OpenVINO EP cannot),
        the caller is answered at its deadline, not when the run ends, and the session
        still answers as it did before."""
        config = make_config(artifact_dir, provider=provider, embed_cache_size=0)
        embedder = ClipEmbedder(config=config).load()
        assert embedder.session_info.provider == provider
        model = embedder._slot.load()
        one = np.full((1, 3, 224, 224), 0.5, np.float32)
        before = model.run(one)
        times = _run_past_a_50ms_deadline(model)
        assert times["answered"] < times["whole_run"] / 2
        np.testing.assert_allclose(model.run(one), before, atol=1e-6)

    def test_frames_over_budget_fail_with_the_per_frame_message(
        self, artifact_dir, jpeg_files, embedder
    ):
        impatient = ClipEmbedder(
            config=make_config(artifact_dir, timeout_s=0.002, batch_size=96, embed_cache_size=0)
        ).load()
        results = impatient.embed_frames([np.zeros((224, 224, 3), np.uint8)] * 96)
        assert {r.error for r in results} == {"Timeout after 0.002s"}
        assert all(r.metadata["inference_time_ms"] is None for r in results)
        deadline = time.monotonic() + 60
        while impatient.active_jobs and time.monotonic() < deadline:
            time.sleep(0.005)
        assert impatient.active_jobs == 0
        # Usable afterwards: the same session answers a strict call correctly.
        np.testing.assert_allclose(
            impatient.embed_images(jpeg_files[:2]), embedder.embed_images(jpeg_files[:2]), atol=1e-6
        )


class TestConcurrencyAndCache:
    def test_many_threads_match_sequential(self, embedder, jpeg_files):
        sequential = [embedder.embed_frame(p).embedding for p in jpeg_files]
        barrier = threading.Barrier(8)

        def worker(i):
            barrier.wait()
            return embedder.embed_frame(jpeg_files[i]).embedding

        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(worker, range(len(jpeg_files))))
        for a, b in zip(sequential, concurrent, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)

    def test_close_racing_in_flight_calls_breaks_none_of_them(
        self, artifact_dir, jpeg_files, embedder
    ):
        expected = [embedder.embed_images([f])[0] for f in jpeg_files[:4]]  # each alone
        racer = ClipEmbedder(config=make_config(artifact_dir, embed_cache_size=0))
        stop = threading.Event()
        closes = 0

        def closer():
            nonlocal closes
            while not stop.is_set():
                racer.close()
                closes += 1
                time.sleep(0.01)

        def caller(i):
            out = []
            for k in range(6):
                result = racer.embed_frame(jpeg_files[(i + k) % 4])
                out.append(((i + k) % 4, result))
            return out

        thread = threading.Thread(target=closer)
        thread.start()
        try:
            with ThreadPoolExecutor(4) as pool:
                outcomes = [r for batch in pool.map(caller, range(4)) for r in batch]
        finally:
            stop.set()
            thread.join()
        assert closes > 10
        for index, result in outcomes:
            assert result.ok, result.error  # never an assert, never a half-closed session
            np.testing.assert_allclose(result.embedding, expected[index], atol=1e-6)

    def test_identical_frames_are_embedded_once(self, artifact_dir, jpeg_files):
        emb = ClipEmbedder(config=make_config(artifact_dir, embed_cache_size=4))
        first = emb.embed_frame(jpeg_files[0])
        second = emb.embed_frame(jpeg_files[0].read_bytes())
        assert emb.cache_stats["hits"] == 1 and emb.cache_stats["misses"] == 1
        np.testing.assert_array_equal(first.embedding, second.embedding)
        emb.embed_frame(jpeg_files[1])
        assert emb.cache_stats["misses"] == 2


class TestSceneAndBatchWorkerPath:
    def test_embed_scene_pools_the_best_frames(self, embedder, jpeg_files):
        frames = [
            (jpeg_files[0], 0.9),
            (jpeg_files[1], 0.1),
            (jpeg_files[2], 0.8),
            (jpeg_files[3], 0.7),
        ]
        result = embedder.embed_scene(frames, top_k=3)
        vectors = embedder.embed_images([jpeg_files[0], jpeg_files[2], jpeg_files[3]])
        expected = vectors.mean(axis=0)
        expected /= np.linalg.norm(expected)
        np.testing.assert_allclose(result.embedding, expected, atol=1e-3)
        assert result.metadata["frame_quality"]["frames_pooled"] == 3

    def test_embed_scene_skips_bad_frames_and_fails_only_if_all_fail(self, embedder, jpeg_files):
        ok = embedder.embed_scene([b"junk", jpeg_files[0]], top_k=2)
        single = embedder.embed_images([jpeg_files[0]])[0]
        assert ok.ok and float(ok.embedding @ single) > 0.999
        bad = embedder.embed_scene([b"junk", b""], top_k=2)
        assert bad.embedding is None and "all 2 frames failed" in bad.error

    def test_embed_frames_isolates_failures(self, embedder, jpeg_files):
        results = embedder.embed_frames([jpeg_files[0], b"junk", jpeg_files[1]])
        assert [r.ok for r in results] == [True, False, True]
        single = embedder.embed_images([jpeg_files[0], jpeg_files[1]])
        assert float(results[0].embedding @ single[0]) > 0.999
        assert float(results[2].embedding @ single[1]) > 0.999


class TestBatchingAcrossScenes:
    def test_embed_scenes_pools_each_scene_like_embed_scene(self, embedder, jpeg_files):
        scenes = [
            [(jpeg_files[0], 0.9), (jpeg_files[1], 0.2), (jpeg_files[2], 0.8)],
            [jpeg_files[3]],
            [b"junk", b""],
            [(jpeg_files[4], 0.5), (b"junk", 0.9)],
        ]
        pooled = embedder.embed_scenes(scenes, top_k=2, frame_paths=["a", "b", "c", "d"])
        assert [r.ok for r in pooled] == [True, True, False, True]
        vectors = embedder.embed_images(
            [jpeg_files[0], jpeg_files[2], jpeg_files[3], jpeg_files[4]]
        )
        first = vectors[:2].mean(axis=0)
        np.testing.assert_allclose(pooled[0].embedding, first / np.linalg.norm(first), atol=1e-3)
        np.testing.assert_allclose(pooled[1].embedding, vectors[2], atol=1e-3)
        assert "all 2 frames failed" in pooled[2].error
        assert pooled[3].metadata["frame_quality"] == {"quality_score": 0.5, "frames_pooled": 1}
        assert [r.metadata["frame_path"] for r in pooled] == ["a", "b", "c", "d"]
        for one, scene in zip(pooled, scenes, strict=True):
            alone = embedder.embed_scene(scene, top_k=2)
            assert alone.ok == one.ok
            if one.ok:
                assert float(alone.embedding @ one.embedding) > 0.999

    def test_frames_of_many_scenes_share_model_runs(self, artifact_dir, jpeg_files):
        emb = ClipEmbedder(config=make_config(artifact_dir, batch_size=8, embed_cache_size=0))
        runs = []
        model = emb._slot.load()
        original = model.session.run

        class CountingSession:  # counts the real session's runs, changes nothing
            def run(self, *args, **kwargs):
                runs.append(args[1][model.input_name].shape[0])
                return original(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(model.session, name)

        object.__setattr__(model, "session", CountingSession())
        scenes = [[jpeg_files[i], jpeg_files[(i + 1) % 8]] for i in range(6)]  # 12 frames
        assert all(r.ok for r in emb.embed_scenes(scenes, top_k=2))
        assert runs == [8, 4]


def _run_past_a_50ms_deadline(model) -> dict[str, float]:
    """A 256-frame run given 50 ms: seconds until the caller got JobTimeout ("answered"),
    until the run's thread ended ("stopped"), and what a whole run takes ("whole_run")."""
    pixels = np.zeros((256, 3, 224, 224), np.float32)
    runner = DeadlineRunner()
    started = time.perf_counter()
    with pytest.raises(JobTimeout):
        runner.run(lambda job: model.run(pixels, job.run_options), timeout_s=0.05)
    answered = time.perf_counter() - started
    while runner.live_jobs and time.perf_counter() - started < 120:
        time.sleep(0.002)
    stopped = time.perf_counter() - started
    assert runner.live_jobs == 0
    full = time.perf_counter()
    model.run(pixels)  # the session is still usable, and a whole run takes this long
    return {"answered": answered, "stopped": stopped, "whole_run": time.perf_counter() - full}
