"""The recipe type: closed choices checked at construction, presets, the manifest record."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from heimdex_clip_export.quantize import PER_TENSOR_RECIPE, SHIPPED_RECIPE
from heimdex_clip_export.recipes import Granularity, Method, QType, QuantRecipe
from heimdex_clip_export.static_qdq import QdqRecipe


def test_presets_record_what_each_graph_was_gated_on():
    shipped = QuantRecipe.per_row_dynamic().to_dict()
    assert shipped["activation_granularity"] == "per_row"
    assert (shipped["weight_type"], shipped["smooth_alpha"], shipped["ort_fusions"]) == (
        "QInt8",
        0.6,
        True,
    )
    previous = QuantRecipe.per_tensor_dynamic().to_dict()
    assert (
        previous["activation_granularity"],
        previous["reduce_range"],
        previous["smooth_alpha"],
    ) == ("per_tensor", True, None)
    text = QuantRecipe.text_dynamic().to_dict()
    assert (text["weight_type"], text["reduce_range"], text["op_types"]) == (
        "QUInt8",
        False,
        ["MatMul", "Gather"],
    )
    qdq = QuantRecipe.static_qdq().to_dict()
    assert (qdq["method"], qdq["quant_format"], qdq["calibrate_method"]) == (
        "static",
        "QDQ",
        "MinMax",
    )
    assert qdq["extra_options"] == {"OpTypesToExcludeOutputQuantization": ["MatMul"]}


def test_a_record_holds_only_the_fields_its_method_reads_and_is_plain_json():
    dynamic, static = SHIPPED_RECIPE.to_dict(), QdqRecipe().to_dict()
    assert "calibrate_method" not in dynamic and "float_budget" not in dynamic
    assert "activation_granularity" not in static and "ort_fusions" not in static
    for record in (dynamic, static):
        assert json.loads(json.dumps(record)) == record


def test_strings_become_enums_and_unknown_choices_fail_at_construction():
    recipe = replace(PER_TENSOR_RECIPE, weight_type="QUInt8")
    assert recipe.weight_type is QType.QUINT8
    assert QuantRecipe(method="static", activation_granularity="per_tensor").method is Method.STATIC
    with pytest.raises(ValueError, match="weight_type='int8'"):
        QuantRecipe(weight_type="int8")
    with pytest.raises(ValueError, match="activation_granularity"):
        QuantRecipe(activation_granularity="per_channel")


@pytest.mark.parametrize(
    "overrides",
    [
        {"reduce_range": True},  # per_row: 7-bit weights are not what it bounds
        {"op_types": ("MatMul", "Gather")},
        {"smooth_alpha": 1.5},
        {"op_types": ()},
        {
            "method": Method.STATIC,
            "activation_granularity": Granularity.PER_TENSOR,
            "excluded_nodes": ("a",),
        },
    ],
)
def test_inconsistent_recipes_fail_at_construction(overrides):
    with pytest.raises(ValueError):
        QuantRecipe(**overrides)


def test_keeping_fp32_adds_nodes_once_in_order():
    recipe = SHIPPED_RECIPE.keeping_fp32(("b", "a")).keeping_fp32(("a", "c"))
    assert recipe.excluded_nodes == ("b", "a", "c")
    assert recipe.to_dict()["excluded_nodes"] == ["b", "a", "c"]
