"""The recipe ladder: the fastest graph that passes the gates, instead of a failed export.

When the shipped recipe misses a gate on a user's model, failing the export leaves the user
(and their Docker build) with nothing to run. The ladder tries, fastest first:

1. ``shipped_recipe``: the recipe as given;
2. ``fp32_matmuls``: the same recipe with the fewest weight MatMuls kept in fp32, the most
   sensitive first (``sensitivity.layer_sensitivity``: each MatMul quantized alone,
   ranked by the drop). Counts 1, 2, 4, ... are tried until one passes, then the gap to
   the last failing count is bisected (fewest layers, assuming more fp32 layers never
   hurt);
3. ``fp32_graph``: no INT8 at all, with a loud warning.

Every attempt's figures go into the manifest. ``strict`` stops after rung 1: the caller
then does what it did before the ladder existed (the image tower fails the export).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .recipes import QuantRecipe
from .sensitivity import LayerDrop

log = logging.getLogger(__name__)

SHIPPED, FP32_MATMULS, FP32_GRAPH = "shipped_recipe", "fp32_matmuls", "fp32_graph"
#: How many of the sensitivity ranking's layers the manifest lists.
RECORDED_DROPS = 10


class Tower(Protocol):
    """What the ladder needs from a tower (image or text)."""

    name: str

    def quantize(self, recipe: QuantRecipe, out_path: Path) -> dict:
        """Write the INT8 graph; return the recipe as recorded."""
        ...

    def evaluate(self, path: Path) -> tuple[dict, list[str]]:
        """The graph's figures against the fp32 graph, and the gates it missed. The graph
        the ladder ships is always the last one evaluated."""
        ...

    def sensitivity(self, recipe: QuantRecipe) -> list[LayerDrop]:
        """The recipe's weight MatMuls, most sensitive first."""
        ...


@dataclass
class Attempt:
    """One graph the ladder built and measured."""

    rung: str
    kept_fp32: tuple[str, ...]
    figures: dict
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            "rung": self.rung,
            "kept_fp32": list(self.kept_fp32),
            "passed": self.passed,
            "figures": self.figures,
            "failures": self.failures,
        }


@dataclass
class Outcome:
    """The rung that passed, the graph's recipe record, and every attempt."""

    rung: str
    record: dict | None
    figures: dict
    kept_fp32: tuple[str, ...] = ()
    attempts: list[Attempt] = field(default_factory=list)
    sensitivity: list[LayerDrop] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "rung": self.rung,
            "kept_fp32": list(self.kept_fp32),
            "attempts": [a.to_dict() for a in self.attempts],
            "sensitivity_top": [d.to_dict() for d in self.sensitivity[:RECORDED_DROPS]],
        }


def climb(
    tower: Tower, recipe: QuantRecipe, fp32_path: Path, out_path: Path, *, strict: bool = False
) -> Outcome:
    """Write ``out_path`` from the first rung that passes; ``fp32_graph`` writes nothing
    (the caller ships ``fp32_path``)."""
    record = tower.quantize(recipe, out_path)
    first = _attempt(tower, SHIPPED, (), out_path)
    if first.passed:
        return Outcome(SHIPPED, record, first.figures, attempts=[first])
    if strict:  # no ladder: the caller fails (image tower) or ships fp32 (text tower)
        out_path.unlink(missing_ok=True)
        log.warning(
            "%s: the shipped recipe missed its gates and --strict stops the ladder: %s",
            tower.name,
            "; ".join(first.failures),
        )
        return Outcome(FP32_GRAPH, None, first.figures, attempts=[first])
    ranking = tower.sensitivity(recipe)
    names = tuple(d.node for d in ranking)
    attempts, records, by_count = [first], {}, {}

    def passes(count: int) -> bool:
        kept = names[:count]
        records[count] = tower.quantize(recipe.keeping_fp32(kept), out_path)
        by_count[count] = _attempt(tower, FP32_MATMULS, kept, out_path)
        attempts.append(by_count[count])
        return by_count[count].passed

    failing, passing, count = 0, None, 1
    while names and passing is None:
        count = min(count, len(names))
        if passes(count):
            passing = count
        elif count == len(names):
            break
        else:
            failing, count = count, count * 2
    if passing is None:
        return _fp32(
            tower,
            fp32_path,
            out_path,
            attempts,
            ranking,
            f"even with all {len(names)} weight MatMuls in fp32",
        )
    while passing - failing > 1:  # fewest layers: bisect between a miss and a pass
        middle = (failing + passing) // 2
        failing, passing = (failing, middle) if passes(middle) else (middle, passing)
    kept = names[:passing]
    if attempts[-1] is not by_count[passing]:  # out_path holds a failed attempt's graph
        records[passing] = tower.quantize(recipe.keeping_fp32(kept), out_path)
        tower.evaluate(out_path)  # the tower's last evaluation is then the shipped graph's
    log.warning(
        "%s: the shipped recipe missed its gates (%s); shipping it with the %d most "
        "sensitive weight MatMuls in fp32: %s",
        tower.name,
        "; ".join(first.failures),
        passing,
        ", ".join(kept),
    )
    return Outcome(
        FP32_MATMULS, records[passing], by_count[passing].figures, kept, attempts, ranking
    )


def _attempt(tower: Tower, rung: str, kept: tuple[str, ...], path: Path) -> Attempt:
    figures, failures = tower.evaluate(path)
    log.info(
        "%s ladder, %s with %d MatMuls in fp32: %s",
        tower.name,
        rung,
        len(kept),
        "passed" if not failures else "missed: " + "; ".join(failures),
    )
    return Attempt(rung, kept, figures, failures)


def _fp32(
    tower: Tower,
    fp32_path: Path,
    out_path: Path,
    attempts: list[Attempt],
    ranking: list[LayerDrop],
    why: str,
) -> Outcome:
    out_path.unlink(missing_ok=True)
    figures, _ = tower.evaluate(fp32_path)
    attempts.append(Attempt(FP32_GRAPH, (), figures, []))
    log.warning("!" * 78)
    log.warning(
        "!!! %s: NO INT8 GRAPH passes the gates (%s): shipping the fp32 graph "
        "(about 4x larger, slower). Missed: %s",
        tower.name,
        why,
        "; ".join(attempts[0].failures),
    )
    log.warning("!" * 78)
    return Outcome(FP32_GRAPH, None, figures, (), attempts, ranking)
