"""The INT8 GEMM floor: ONNX Runtime's ``MatMulInteger`` alone, on an artifact's own shapes.

An INT8 image tower cannot run faster than its integer matrix multiplications. This module
reads those multiplications off the artifact's own graph (one profiled run at batch 1 and
one at batch 2: every quantized GEMM's ``[M, K] x [K, N]``, so patch embedding, Q/K/V,
attention output, MLP up and down and the final projection, whatever the graph has), builds
a graph of nothing but ``MatMulInteger`` on those shapes (uint8 activations around the
artifact's zero point of 128, a distinct int8 weight matrix per GEMM so the weights stream
from memory as the model's do), and times it with the runtime's own session options and
thread count. Every other figure (the tower at batch 1 and 32, JPEG -> vector, a text
query) then also reads as a multiple of this floor, which means the same on any CPU.

Reading the shapes needs only ONNX Runtime; writing the floor graph needs the ``onnx``
package (``pip install 'heimdex-clip[bench]'``), imported only here and only when a floor
is measured, so the runtime's own dependencies stay as they are.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .artifact import Manifest
from .session import session_options
from .verified import read_verified

#: Operators whose work is an INT8 GEMM (what the floor replaces by MatMulInteger alone).
QUANTIZED_GEMMS = (
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
)
#: The per-row activation zero point of the shipped recipe (rowwise.py).
ACTIVATION_ZERO_POINT = 128


class FloorUnavailable(RuntimeError):
    """The floor cannot be measured here (no ``onnx`` package, or no INT8 GEMM in the graph)."""


@dataclass(frozen=True)
class Gemm:
    """One INT8 GEMM of the graph: ``rows_per_image`` x ``k`` times ``k`` x ``n``."""

    rows_per_image: int
    k: int
    n: int
    count: int = 1

    def multiply_adds_per_image(self) -> int:
        return self.rows_per_image * self.k * self.n * self.count


Feed = Callable[[int], dict[str, np.ndarray]]


def image_feed(input_name: str, image_size: int) -> Feed:
    """Inputs of an image tower at a batch size (zeros: shapes are all that matters here)."""
    return lambda batch: {input_name: np.zeros((batch, 3, image_size, image_size), np.float32)}


def _profiled_gemms(
    graph: Path | bytes, feed: Feed, batch: int, threads: int
) -> list[tuple[int, int, int]]:
    """(M, K, N) of every quantized GEMM kernel in one run at ``batch``, in run order."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads=threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "gemms")
        source = str(graph) if isinstance(graph, Path) else graph
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        session.run(None, feed(batch))
        events = json.loads(Path(session.end_profiling()).read_text())
    shapes = []
    for event in sorted(events, key=lambda e: e.get("ts", 0)):
        args = event.get("args", {})
        if (
            event.get("cat") != "Node"
            or not event["name"].endswith("_kernel_time")
            or args.get("op_name") not in QUANTIZED_GEMMS
        ):
            continue
        # N from the output: a prepacked weight input is not reported with its own shape.
        a_shape = next(iter(args["input_type_shape"][0].values()))
        out_shape = next(iter(args["output_type_shape"][0].values()))
        shapes.append((int(np.prod(a_shape[:-1])), int(a_shape[-1]), int(out_shape[-1])))
    return shapes


def artifact_gemms(graph: Path | bytes, feed: Feed, threads: int = 1) -> list[Gemm]:
    """The graph's INT8 GEMMs per image, grouped by shape (largest work first).

    Rows per image come from runs at batch 1 and 2; a GEMM whose rows do not double with
    the batch (nothing in a ViT tower) makes this fail rather than guess.
    """
    one = _profiled_gemms(graph, feed, 1, threads)
    two = _profiled_gemms(graph, feed, 2, threads)
    if not one:
        raise FloorUnavailable("the graph has no INT8 GEMM (an fp32 graph has no INT8 floor)")
    if sorted((2 * m, k, n) for m, k, n in one) != sorted(two):
        raise FloorUnavailable("the graph's GEMM rows do not scale with the batch size")
    counts = Counter(one)
    return sorted(
        (Gemm(m, k, n, c) for (m, k, n), c in counts.items()),
        key=lambda g: -g.multiply_adds_per_image(),
    )


def floor_graph(gemms: list[Gemm], batch: int, seed: int = 0) -> bytes:
    """A graph of only ``MatMulInteger`` nodes with the shapes of ``gemms`` at ``batch``.

    Each GEMM gets its own random int8 weights (a constant, prepacked as the model's are);
    GEMMs with the same input shape share one uint8 input. Each output feeds a one-element
    ``Slice`` (a graph output), so no GEMM is dead code and no output is copied back whole.
    """
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # an optional extra: the runtime itself never needs onnx
        raise FloorUnavailable(
            "measuring the GEMM floor needs the onnx package: pip install 'heimdex-clip[bench]'"
        ) from exc
    rng = np.random.default_rng(seed)
    zero = numpy_helper.from_array(np.array(ACTIVATION_ZERO_POINT, np.uint8), "a_zero_point")
    firsts = [
        numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "ends"),
    ]
    nodes: list[Any] = []
    inputs: dict[str, Any] = {}
    outputs: list[Any] = []
    inits: list[Any] = [zero, *firsts]
    for gemm in gemms:
        rows = gemm.rows_per_image * batch
        a = f"a_{rows}x{gemm.k}"
        inputs.setdefault(a, helper.make_tensor_value_info(a, TensorProto.UINT8, [rows, gemm.k]))
        for copy in range(gemm.count):
            name = f"gemm_{rows}x{gemm.k}x{gemm.n}_{copy}"
            # |w| <= 64: no adjacent pair can saturate a non-VNNI kernel (rowwise.py's bound),
            # so the integer result is exact on every x86 kernel, like the artifact's.
            weights = rng.integers(-64, 65, (gemm.k, gemm.n), dtype=np.int8)
            inits.append(numpy_helper.from_array(weights, name + "/w"))
            nodes.append(
                helper.make_node(
                    "MatMulInteger", [a, name + "/w", "a_zero_point"], [name], name=name
                )
            )
            nodes.append(helper.make_node("Slice", [name, "starts", "ends"], [name + "/y"]))
            outputs.append(helper.make_tensor_value_info(name + "/y", TensorProto.INT32, [1, 1]))
    graph = helper.make_graph(nodes, "int8_gemm_floor", list(inputs.values()), outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime the runtime supports
    return model.SerializeToString()


class GemmFloor:
    """The floor graph of ``gemms`` at one batch size, loaded and ready to time."""

    def __init__(self, gemms: list[Gemm], batch: int, threads: int) -> None:
        self.gemms, self.batch = gemms, batch
        self.session = ort.InferenceSession(
            floor_graph(gemms, batch),
            session_options(threads=threads),
            providers=["CPUExecutionProvider"],
        )
        rng = np.random.default_rng(1)
        self.feeds = {
            i.name: rng.integers(0, 256, i.shape, dtype=np.uint8) for i in self.session.get_inputs()
        }

    def run(self) -> None:
        self.session.run(None, self.feeds)

    def ms_per_image(self, repeats: int = 5) -> float:
        """Median wall time per image of ``repeats`` runs (after one warm-up run)."""
        self.run()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            self.run()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000 / self.batch


def describe(gemms: list[Gemm]) -> dict:
    """The GEMM shapes per image and their multiply-adds, as a report records them."""
    return {
        "gemms_per_image": sum(g.count for g in gemms),
        "multiply_adds_per_image": sum(g.multiply_adds_per_image() for g in gemms),
        "shapes": [
            f"{g.count} x [{g.rows_per_image}/image x {g.k}] x [{g.k} x {g.n}]" for g in gemms
        ],
    }


def measure_floor(
    graph: Path | bytes, feed: Feed, batches: list[int], threads: int, repeats: int = 5
) -> dict:
    """ms/image of the floor at each batch size, with the shapes it was built from."""
    gemms = artifact_gemms(graph, feed, threads)
    info = describe(gemms)
    figures = {}
    for batch in batches:
        figures[batch] = round(GemmFloor(gemms, batch, threads).ms_per_image(repeats), 3)
    rate = {
        b: round(info["multiply_adds_per_image"] / (v / 1000) / 1e9, 1) for b, v in figures.items()
    }
    return {**info, "ms_per_image": figures, "g_multiply_adds_per_s": rate, "threads": threads}


def artifact_floor(
    artifact_dir: Path,
    manifest: Manifest,
    batches: list[int],
    threads: int,
    repeats: int = 5,
    key: str = "visual.int8",
) -> dict:
    """The floor of the artifact's graph ``key`` (an image tower), or ``{"error": why}``."""
    if key not in manifest.files:
        return {"error": f"the artifact has no {key} graph"}
    entry = manifest.files[key]
    try:
        graph = read_verified(artifact_dir / entry.path, entry)
        feed = image_feed(entry.inputs[0].name, manifest.preprocess.image_size)
        return {"graph": key, **measure_floor(graph, feed, batches, threads, repeats)}
    except FloorUnavailable as exc:
        return {"error": str(exc)}


def multiple(ms: float | None, floor_ms: float | None) -> str:
    """``ms`` as a multiple of the floor, e.g. ``1.42x``; ``-`` when either is missing."""
    return f"{ms / floor_ms:.2f}x" if ms and floor_ms else "-"


def floor_line(floor: dict) -> str:
    """One line saying what the floor is, or why it was not measured."""
    if not floor:
        return "INT8 GEMM floor: not measured"
    if "error" in floor:
        return f"INT8 GEMM floor: not measured: {floor['error']}"
    figures = ", ".join(
        f"batch {b} {v:.2f} ms/img ({floor['g_multiply_adds_per_s'][b]} G/s)"
        for b, v in floor["ms_per_image"].items()
    )
    return (
        f"INT8 GEMM floor ({floor['graph']}'s {floor['gemms_per_image']} INT8 GEMMs, "
        f"{floor['multiply_adds_per_image'] / 1e9:.2f} G multiply-adds per image, as "
        f"MatMulInteger alone, {floor['threads']} threads): {figures}"
    )
