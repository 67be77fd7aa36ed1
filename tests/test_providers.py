"""Execution providers: cpu always, OpenVINO where its plugin runs, auto by measurement.

Real ONNX Runtime sessions and the real OpenVINO EP plugin throughout. Which providers can
run is a fact of the machine: the expectation is derived here from /proc/cpuinfo (the
plugin claims Intel CPUs only), independently of the code under test.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from heimdex_clip import bench, cpu, providers
from heimdex_clip import session as sessions
from heimdex_clip.artifact import load_manifest
from heimdex_clip.cli import main
from heimdex_clip.config import ClipConfig
from heimdex_clip.embedder import ClipEmbedder
from heimdex_clip.errors import ConfigError
from heimdex_clip.preprocess import Preprocessor
from heimdex_clip.providers import ProviderSetup, graph_key

PLUGIN_INSTALLED = importlib.util.find_spec("onnxruntime_ep_openvino") is not None


def _cpu_vendor() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return "unknown"


#: The plugin's device discovery only offers Intel hardware to ONNX Runtime.
OPENVINO_EXPECTED = PLUGIN_INSTALLED and _cpu_vendor() == "GenuineIntel"


@pytest.fixture
def fresh_plugin_state():
    """Provider discovery is cached per process; tests that fake a fault start afresh."""
    providers.openvino_status.cache_clear()
    yield
    providers.openvino_status.cache_clear()


def _embed_one(artifact_dir: Path, **settings: object) -> tuple[ClipEmbedder, dict]:
    embedder = ClipEmbedder(model_dir=artifact_dir, config=ClipConfig(**settings))
    result = embedder.embed_frame(np.full((240, 320, 3), 128, np.uint8))
    assert result.ok, result.error
    return embedder, result.metadata


def test_provider_setting():
    assert ClipConfig.from_env({}).provider == "auto"
    for value in ("auto", "CPU", "openvino"):
        assert ClipConfig.from_env({"CLIP_PROVIDER": value}).provider == value.lower()
    with pytest.raises(ConfigError, match="'auto' or 'cpu' or 'openvino'"):
        ClipConfig.from_env({"CLIP_PROVIDER": "cuda"})


def test_cpu_provider_always_runs(artifact_dir):
    embedder, metadata = _embed_one(artifact_dir, provider="cpu")
    assert metadata["provider"] == "cpu"
    assert embedder.session_info.providers == ["CPUExecutionProvider"]


def test_openvino_runs_exactly_where_the_plugin_claims_this_cpu(artifact_dir, caplog):
    if not PLUGIN_INSTALLED:
        if os.environ.get("CI"):
            pytest.fail("CI must install the openvino extra (make setup does)")
        pytest.skip("the openvino extra is not installed here (pip install -e '.[openvino]')")
    caplog.set_level(logging.WARNING)
    embedder, metadata = _embed_one(artifact_dir, provider="openvino")
    if OPENVINO_EXPECTED:
        assert metadata["provider"] == "openvino"
        assert providers.OPENVINO_EP in embedder.session_info.providers
        # Same frame on ONNX Runtime's CPU provider, fp32 graph: the OpenVINO graph agrees.
        ours = embedder.embed_images([np.full((240, 320, 3), 128, np.uint8)])[0]
        ref_embedder = ClipEmbedder(
            model_dir=artifact_dir, config=ClipConfig(provider="cpu", precision="fp32")
        )
        theirs = ref_embedder.embed_images([np.full((240, 320, 3), 128, np.uint8)])[0]
        assert float(ours @ theirs) > 0.98
    else:
        assert metadata["provider"] == "cpu"
        assert embedder.session_info.providers == ["CPUExecutionProvider"]
        assert "CLIP_PROVIDER=openvino cannot run here, using cpu" in caplog.text
        assert "claims Intel devices only" in caplog.text


def test_absent_plugin_falls_back_to_cpu(artifact_dir, monkeypatch, caplog, fresh_plugin_state):
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # import fails
    caplog.set_level(logging.WARNING)
    _, metadata = _embed_one(artifact_dir, provider="openvino")
    assert metadata["provider"] == "cpu"
    assert "the openvino extra is not installed" in caplog.text


def test_broken_plugin_falls_back_to_cpu(
    artifact_dir, tmp_path, monkeypatch, caplog, fresh_plugin_state
):
    # A plugin package whose library is not a shared object: ONNX Runtime really fails
    # to load it.
    package = tmp_path / "onnxruntime_ep_openvino"
    package.mkdir()
    (package / "broken.so").write_bytes(b"\x7fELF but not really")
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def get_library_path():\n"
        "    return str(Path(__file__).with_name('broken.so'))\n"
    )
    monkeypatch.delitem(sys.modules, "onnxruntime_ep_openvino", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    caplog.set_level(logging.WARNING)
    _, metadata = _embed_one(artifact_dir, provider="openvino")
    assert metadata["provider"] == "cpu"
    assert "could not be loaded into onnxruntime" in caplog.text


def test_auto_measures_once_then_uses_its_cache(artifact_dir, tmp_path):
    # Two real sessions of different cost stand in for the two providers (this machine may
    # run only one of them): the decision logic is the same.
    calls = {"cpu": 0, "openvino": 0}

    def measure(provider: str, graph: str):
        def run() -> float:
            calls[provider] += 1
            session, _ = sessions.create_session(artifact_dir / f"visual.{graph}.onnx")
            return bench.ms_per_image(session, 1, repeats=1)

        return run

    cache = tmp_path / "cache" / providers.AUTO_CACHE_NAME
    key = {"artifact_id": "test", "threads": 2}
    candidates = {"cpu": measure("cpu", "int8"), "openvino": measure("openvino", "fp32")}
    choice, why = providers.resolve_auto(cache, key, lambda: candidates)
    [entry] = json.loads(cache.read_text())["entries"].values()
    figures = entry["ms_per_image"]
    # Once each, or twice each when the two came out within CLOSE_CALL (under load).
    rounds = 2 if providers._close_call(figures) else 1
    assert calls == {"cpu": rounds, "openvino": rounds} and "measured now" in why
    assert set(figures) == {"cpu", "openvino"} and all(v > 0 for v in figures.values())
    assert choice == entry["choice"] == min(figures, key=figures.__getitem__)

    again, why = providers.resolve_auto(cache, key, lambda: candidates)
    assert again == choice and calls == {"cpu": rounds, "openvino": rounds} and "cache" in why
    # Another CPU / artifact / library version is another decision.
    providers.resolve_auto(cache, {**key, "artifact_id": "other"}, lambda: candidates)
    assert calls["cpu"] == calls["openvino"] > rounds
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_a_close_call_is_measured_again_in_the_other_order(tmp_path):
    """Timing functions stand in for the providers here: a load change between two
    measurements cannot be produced on demand on a real machine. openvino is the faster
    one, but a load spike hits it the first time; measured again after cpu, it wins."""
    order: list[str] = []
    figures = {"cpu": iter([10.0, 10.2]), "openvino": iter([10.9, 8.0])}

    def timed(name: str):
        return lambda: order.append(name) or next(figures[name])

    candidates = {"cpu": timed("cpu"), "openvino": timed("openvino")}
    cache = tmp_path / providers.AUTO_CACHE_NAME
    choice, _ = providers.resolve_auto(cache, {"k": 1}, lambda: candidates)
    assert order == ["cpu", "openvino", "openvino", "cpu"] and choice == "openvino"
    [entry] = json.loads(cache.read_text())["entries"].values()
    assert entry["ms_per_image"] == {"cpu": 10.0, "openvino": 8.0}
    # Far apart (more than CLOSE_CALL): measured once each.
    order.clear()
    figures.update(cpu=iter([10.0]), openvino=iter([5.0]))
    choice, _ = providers.resolve_auto(cache, {"k": 2}, lambda: candidates)
    assert order == ["cpu", "openvino"] and choice == "openvino"


def test_auto_with_an_unwritable_cache_uses_cpu_without_measuring(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    measured = []
    candidates = {
        "cpu": lambda: measured.append("cpu") or 1.0,
        "openvino": lambda: measured.append("openvino") or 0.5,
    }
    caplog.set_level(logging.WARNING)
    choice, _ = providers.resolve_auto(
        blocker / "cache" / providers.AUTO_CACHE_NAME, {}, lambda: candidates
    )
    assert choice == "cpu" and measured == []
    assert "not writable" in caplog.text and "CLIP_CACHE_DIR" in caplog.text


def test_auto_on_the_real_artifact(artifact_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    _, metadata = _embed_one(artifact_dir, provider="auto", cache_dir=cache_dir)
    runnable = [name for name, why in providers.available_providers().items() if why is None]
    assert metadata["provider"] in runnable
    cache = cache_dir / providers.AUTO_CACHE_NAME
    if not PLUGIN_INSTALLED:  # nothing to compare and nothing to load: no cache either
        assert metadata["provider"] == "cpu" and not cache.exists()
        return
    [entry] = json.loads(cache.read_text())["entries"].values()
    assert metadata["provider"] == entry["choice"]
    if runnable == ["cpu"]:  # remembered, so later starts skip loading OpenVINO at all
        assert entry == {**entry, "choice": "cpu", "ms_per_image": {}}
    else:
        assert set(entry["ms_per_image"]) == set(runnable)
    # The next start reads the decision and does not look for OpenVINO devices.
    providers.openvino_status.cache_clear()
    _, again = _embed_one(artifact_dir, provider="auto", cache_dir=cache_dir)
    assert again["provider"] == entry["choice"]
    if entry["choice"] == "cpu":
        assert providers.openvino_status.cache_info().currsize == 0


def test_openvino_computes_in_bf16_only_where_the_cpu_does_and_approximation_is_accepted():
    flags = next(
        set(line.split(":", 1)[1].split())
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
    )
    bf16 = bool(flags & {"amx_bf16", "avx512_bf16"})
    assert providers.openvino_precision_hint(exact=False) == ("bf16" if bf16 else "f32")
    assert providers.openvino_precision_hint(exact=True) == "f32"  # CLIP_PRECISION=fp32


def test_an_auto_decision_is_kept_per_precision_and_hint(artifact_dir, tmp_path):
    """CLIP_PRECISION=fp32 compares other graphs than int8 does: a decision for one must not
    answer for the other, nor outlive a change of OpenVINO's precision hint."""
    manifest = load_manifest(artifact_dir)
    int8 = providers.auto_cache(ClipConfig(cache_dir=tmp_path), manifest)[1]
    fp32 = providers.auto_cache(ClipConfig(cache_dir=tmp_path, precision="fp32"), manifest)[1]
    assert int8 != fp32
    assert (int8["precision"], fp32["precision"]) == ("int8", "fp32")
    assert int8["openvino_hint"] == providers.openvino_precision_hint(exact=False)
    assert fp32["openvino_hint"] == "f32"


def test_each_provider_gets_the_graph_it_runs_best(artifact_dir):
    manifest = load_manifest(artifact_dir)
    assert graph_key("cpu", "int8", manifest) == "visual.int8"
    assert graph_key("cpu", "fp32", manifest) == "visual.fp32"
    expected = "visual.qdq" if "visual.qdq" in manifest.files else "visual.fp32"
    assert graph_key("openvino", "int8", manifest) == expected


def _qdq_artifact(artifact_dir: Path) -> Path:
    if not (artifact_dir / "visual.qdq.onnx").is_file():
        if os.environ.get("CI"):
            pytest.fail("CI's test artifact must be exported with --openvino (make test does)")
        pytest.skip("this test artifact was exported without --openvino (no visual.qdq)")
    return artifact_dir


def _recipe_describes_the_graph(recipe: dict, path: Path) -> None:
    """The manifest's QDQ recipe matches the graph: smoothing and calibration recorded, the
    float MatMuls it lists (within its budget) are the only unquantized weight MatMuls, and
    no MatMul output is re-quantized when the recipe says so."""
    assert recipe["method"] == "static" and recipe["calibration_images"] >= 60
    assert recipe["smooth_alpha"] is None or 0 < recipe["smooth_alpha"] < 1
    assert len(recipe["float_matmuls"]) <= recipe["float_budget"]
    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    float_weight_matmuls = {
        n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits
    }
    assert float_weight_matmuls == set(recipe["float_matmuls"])
    matmul_outputs = {n.output[0] for n in graph.node if n.op_type == "MatMul"}
    requantized = [
        n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in matmul_outputs
    ]
    if "MatMul" in recipe["extra_options"].get("OpTypesToExcludeOutputQuantization", []):
        assert not requantized
    assert (
        sum(
            n.op_type == "MatMul"
            and producer.get(n.input[1]) is not None
            and producer[n.input[1]].op_type == "DequantizeLinear"
            for n in graph.node
        )
        > 0
    )


def test_qdq_graph_is_hashed_gated_and_holds_its_gates(artifact_dir, photos):
    artifact = _qdq_artifact(artifact_dir)
    manifest = load_manifest(artifact)
    entry = manifest.file("visual.qdq")
    recorded = manifest.parity["qdq_vs_fp32"]
    export_gates = manifest.parity["gates"]  # the INT8 gates this export applied
    assert recorded["gates"] == {
        "mean_cosine": export_gates["int8_mean_cosine"],
        "min_cosine": export_gates["int8_min_cosine"],
        "top5_agreement": export_gates["int8_top5_agreement"],
        "batch_invariance_min_cosine": export_gates["batch_invariance_min_cosine"],
    }
    floors = {"mean_cosine": 0.995, "min_cosine": 0.98, "top5_agreement": 0.9}
    for name, floor in floors.items():
        assert recorded["gates"][name] >= floor and recorded[name] >= recorded["gates"][name]
    invariance = manifest.parity["qdq_batch_invariance"]["min_cosine"]
    assert invariance >= recorded["gates"]["batch_invariance_min_cosine"]
    assert manifest.parity["qdq_recipe"]["quant_format"] == "QDQ"
    _recipe_describes_the_graph(manifest.parity["qdq_recipe"], artifact / entry.path)
    # Recompute on real photographs the export did not calibrate on (whole photos through
    # the runtime's own preprocessing), QDQ vs fp32, both run as written on the CPU (no
    # kernel of this machine's in between: see exact_qdq_session).
    from heimdex_clip_export.static_qdq import exact_qdq_session

    pixels = Preprocessor(manifest.preprocess)([img for _, img in photos])
    outputs = {}
    for graph in ("visual.qdq", "visual.fp32"):
        session = exact_qdq_session(artifact / manifest.file(graph).path)
        outputs[graph] = session.run([entry.outputs[0].name], {entry.inputs[0].name: pixels})[0]
    cos = np.sum(outputs["visual.qdq"] * outputs["visual.fp32"], axis=1)
    assert cos.mean() >= 0.995 and cos.min() >= 0.98
    # Its bytes are verified at load like every other graph.
    config = ClipConfig(provider="cpu")
    assert graph_key("openvino", "int8", manifest) == "visual.qdq"
    assert ClipEmbedder(model_dir=artifact, config=config).embed_images([photos[0][1]]).shape == (
        1,
        512,
    )


def test_openvino_without_a_graph_for_it_says_so(artifact_dir, tmp_path, caplog):
    # An artifact with only the dynamic INT8 graph: OpenVINO has nothing worth running.
    slim = tmp_path / "slim"
    slim.mkdir()
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    manifest["files"] = {"visual.int8": manifest["files"]["visual.int8"]}
    (slim / "manifest.json").write_text(json.dumps(manifest))
    # A hard link (the same file, inside the directory): a symlink out of the artifact
    # directory is refused (docs/reliability.md).
    try:
        os.link(artifact_dir / "visual.int8.onnx", slim / "visual.int8.onnx")
    except OSError:  # another file system
        shutil.copy(artifact_dir / "visual.int8.onnx", slim / "visual.int8.onnx")
    assert graph_key("openvino", "int8", load_manifest(slim)) is None
    caplog.set_level(logging.WARNING)
    _, metadata = _embed_one(slim, provider="openvino")
    assert metadata["provider"] == "cpu"
    assert "CLIP_PROVIDER=openvino cannot run here, using cpu" in caplog.text
    if OPENVINO_EXPECTED:  # elsewhere the plugin's own reason comes first
        assert "has no graph for it" in caplog.text


def test_bench_command_measures_every_graph_and_updates_autos_cache(
    artifact_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path))
    assert (
        main(
            ["--model-dir", str(artifact_dir), "bench", "--batch", "2", "--repeats", "1", "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    manifest = load_manifest(artifact_dir)
    cpu_rows = {r["graph"]: r for r in report["rows"] if r["provider"] == "cpu"}
    assert set(cpu_rows) == {k for k in manifest.files if k.startswith("visual.")}
    for row in cpu_rows.values():
        assert row["error"] is None and row["ran_on"] == "cpu"
        assert all(float(v) > 0 for v in row["ms_per_image"].values())
        assert set(row["ms_per_image"]) == {"1", "2"}
    assert cpu_rows["visual.int8"]["default"] and not cpu_rows["visual.fp32"]["default"]
    # The INT8 GEMM floor of the artifact's own shapes, at the same batch sizes.
    floor = report["gemm_floor"]
    assert floor["graph"] == "visual.int8" and floor["gemms_per_image"] == 74
    assert set(floor["ms_per_image"]) == {"1", "2"}
    ov_rows = [r for r in report["rows"] if r["provider"] == "openvino"]
    assert bool(ov_rows) == OPENVINO_EXPECTED
    if not OPENVINO_EXPECTED:
        assert "openvino" in report["unavailable"]
    # auto's pick is the fastest of each provider's own graph, and it is now cached.
    auto = report["auto"]
    assert auto["choice"] == min(auto["ms_per_image"], key=auto["ms_per_image"].__getitem__)
    cache = json.loads((tmp_path / providers.AUTO_CACHE_NAME).read_text())
    [entry] = cache["entries"].values()
    assert entry["choice"] == auto["choice"] and auto["cache_updated"]
    # The next load with CLIP_PROVIDER=auto (same batch size) takes that decision: no new
    # entry is written.
    _, metadata = _embed_one(artifact_dir, provider="auto", cache_dir=tmp_path, batch_size=2)
    assert metadata["provider"] == auto["choice"]
    assert json.loads((tmp_path / providers.AUTO_CACHE_NAME).read_text()) == cache


def test_a_session_the_plugin_refuses_reloads_cpus_own_graph(artifact_dir, monkeypatch, caplog):
    # The plugin passing discovery but refusing the session cannot be produced on demand:
    # the resolved provider is forced to the one asked for, and the plugin state says it has no
    # device (so session creation fails inside the runtime's OpenVINO option setup).
    from heimdex_clip import model

    monkeypatch.setattr(model, "choose_provider", lambda config, *args: config.provider)
    monkeypatch.setattr(
        providers,
        "openvino_status",
        lambda: providers.OpenVinoStatus(None, "refused for this test", None),
    )
    caplog.set_level(logging.WARNING)
    frame = np.full((240, 320, 3), 90, np.uint8)
    refused = ClipEmbedder(model_dir=artifact_dir, config=ClipConfig(provider="openvino"))
    plain = ClipEmbedder(model_dir=artifact_dir, config=ClipConfig(provider="cpu"))
    got, want = refused.embed_frame(frame), plain.embed_frame(frame)
    assert got.metadata["provider"] == "cpu" and "refused for this test" in caplog.text
    # Bit-identical to the cpu provider's own graph (the QDQ graph would differ).
    assert np.array_equal(got.embedding, want.embedding)


def test_info_reports_the_provider_that_runs(artifact_dir, monkeypatch, capsys):
    monkeypatch.setenv("CLIP_PROVIDER", "openvino")
    assert main(["--model-dir", str(artifact_dir), "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    session = info["session"]
    assert info["clip_providers"]["cpu"] is None
    assert (info["clip_providers"]["openvino"] is None) == OPENVINO_EXPECTED
    assert session["provider"] == ("openvino" if OPENVINO_EXPECTED else "cpu")
    assert main(["--model-dir", str(artifact_dir), "info"]) == 0
    text = capsys.readouterr().out
    assert f"provider={session['provider']}" in text and "CLIP_PROVIDER=cpu: runs here" in text


def test_a_provider_setup_is_what_the_session_runs_with(artifact_dir, caplog):
    setup = ProviderSetup(threads=1, memory_arena=False)
    caplog.set_level(logging.DEBUG, logger="heimdex_clip.session")
    session, info = sessions.build_session(artifact_dir / "visual.int8.onnx", setup)
    assert (info.provider, info.intra_op_threads, info.memory_arena) == ("cpu", 1, False)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "intra_op_threads=1" in caplog.text and "memory_arena=False" in caplog.text
    # Unset, the thread count is this process's physical cores.
    assert ProviderSetup().intra_op_threads == cpu.physical_cores()
    openvino = ProviderSetup(provider="openvino", threads=3, precision_hint="bf16")
    assert openvino.provider_options == {
        "CPU": {
            "INFERENCE_NUM_THREADS": "3",
            "INFERENCE_PRECISION_HINT": "bf16",
            "PERFORMANCE_HINT": "LATENCY",
        }
    }
    assert openvino.on_cpu().provider_options is None


def test_names_that_moved_out_of_session_and_model_still_import():
    # Code written before heimdex_clip.providers / heimdex_clip.cpu imported these from here.
    from heimdex_clip import model

    assert sessions.cpu_features is cpu.cpu_features
    assert sessions.physical_cores is cpu.physical_cores
    assert sessions.session_options is providers.session_options
    assert sessions.available_providers is providers.available_providers
    assert sessions.openvino_status is providers.openvino_status
    assert model.graph_key is providers.graph_key and model.auto_cache is providers.auto_cache
