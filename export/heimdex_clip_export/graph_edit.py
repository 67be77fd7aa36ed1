"""Small helpers for editing an ONNX graph in place (used by the fusion passes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class Graph:
    """Producer/consumer lookups over a graph that is being edited."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self) -> None:
        self.inits = {i.name: i for i in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node reading ``name``, if exactly one does and it is no graph output."""
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def const(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name``, or None if it is not one."""
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def scalar(self, name: str) -> float | None:
        value = self.const(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def add_const(self, name: str, value: np.ndarray) -> str:
        """Add an initializer under a name not used yet (``name`` or ``name/N``)."""
        unique, n = name, 0
        while unique in self.inits or unique in self.producer:
            n += 1
            unique = f"{name}/{n}"
        init = numpy_helper.from_array(np.asarray(value), unique)
        self.graph.initializer.append(init)
        self.inits[unique] = init
        return unique

    def remove_dead(self) -> None:
        """Drop the nodes no graph output depends on, then unused initializers."""
        while True:
            used = {i for n in self.graph.node for i in n.input} | self.outputs
            live = [n for n in self.graph.node if any(o and o in used for o in n.output)]
            if len(live) == len(self.graph.node):
                break
            del self.graph.node[:]
            self.graph.node.extend(live)
        used = {i for n in self.graph.node for i in n.input}
        kept = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        self.refresh()


def default_opset(model: onnx.ModelProto) -> int:
    """The opset of the model's default (``ai.onnx``) domain."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def probe_shapes(
    model: onnx.ModelProto, names: list[str], batch: int = 2
) -> dict[str, tuple[int, ...]] | None:
    """Concrete shapes of tensors ``names`` when ``model`` runs on ``batch`` zero images.

    None if the graph input has a dynamic dimension other than the first (its shapes then
    cannot be read off one run).
    """
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims[1:]):
        return None
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
        for n in dict.fromkeys(names)
        if n not in known
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    dtype = helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
    feed = np.zeros((batch, *[d.dim_value for d in dims[1:]]), dtype)
    values = session.run(list(dict.fromkeys(names)), {graph_input.name: feed})
    return {n: tuple(v.shape) for n, v in zip(dict.fromkeys(names), values, strict=True)}


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder nodes so each comes after its inputs' producers (new nodes were appended)."""
    graph = model.graph
    ready = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError("graph has a cycle or a missing input after fusion")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)
