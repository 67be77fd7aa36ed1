"""The accuracy gates an artifact must pass before it is written, for both towers.

Kept apart from the pipeline that applies them (and from the text tower's export) so that
each tower's code reads its thresholds from here instead of from the other's module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


class GateError(RuntimeError):
    """A measured figure missed its gate; the export was abandoned."""


@dataclass(frozen=True)
class Gates:
    """The accuracy an artifact must show before it is written (real trained weights)."""

    fp32_min_cosine: float = 0.99999
    int8_mean_cosine: float = 0.999
    int8_min_cosine: float = 0.99
    int8_top5_agreement: float = 0.95
    #: An image alone vs inside a batch: search must not depend on what was batched with it.
    batch_invariance_min_cosine: float = 0.9999
    min_eval_images: int = 100


#: A seeded random init has no activation outliers; it keeps the looser INT8 figures it
#: was first gated on (the batch-invariance gate is the same).
RANDOM_INIT_GATES = replace(
    Gates(), int8_mean_cosine=0.995, int8_min_cosine=0.98, int8_top5_agreement=0.9
)


def text_gates(gates: Gates) -> dict[str, float]:
    """The image tower's thresholds, applied to the text tower (recorded in the manifest):
    its top-5 agreement becomes the text -> image retrieval overlap."""
    return {
        "fp32_min_cosine": gates.fp32_min_cosine,
        "int8_mean_cosine": gates.int8_mean_cosine,
        "int8_min_cosine": gates.int8_min_cosine,
        "int8_retrieval_top5_overlap": gates.int8_top5_agreement,
    }


def raise_if(failures: list[str], stage: str) -> None:
    """GateError naming every missed gate of ``stage``, if any."""
    if failures:
        raise GateError(f"{stage} gate failed; no artifact written: " + "; ".join(failures))
