"""Wire enums come from the proto descriptors: every core member has a wire value of the same
short name, the zero value maps to the documented default, and the client offers the names the
server accepts."""

from __future__ import annotations

from enum import Enum

import pytest

from vitscope.enums import short_names
from vitscope.v1 import activations_pb2, common_pb2, explain_pb2, features_pb2, tensor_pb2
from vitscope_server.core.activations.compute import Reduction, TensorDType
from vitscope_server.core.explain.gradients import Baseline
from vitscope_server.core.features.optimize import Objective
from vitscope_server.core.model.tokens import TokenMode
from vitscope_server.transport import convert, convert_explain, convert_features
from vitscope_server.transport.enums import core_to_wire, wire_to_core


def test_short_names_drop_the_type_prefix_and_the_zero_value() -> None:
    assert short_names(features_pb2.FeatureObjective) == {
        "patch_mean": features_pb2.FEATURE_OBJECTIVE_PATCH_MEAN,
        "token": features_pb2.FEATURE_OBJECTIVE_TOKEN,
        "cls": features_pb2.FEATURE_OBJECTIVE_CLS,
        "direction": features_pb2.FEATURE_OBJECTIVE_DIRECTION,
        "class_logit": features_pb2.FEATURE_OBJECTIVE_CLASS_LOGIT,
    }
    assert short_names(tensor_pb2.Dtype, unspecified=True)["unspecified"] == 0


@pytest.mark.parametrize(
    ("wire", "core", "default"),
    [
        (activations_pb2.Reduction, convert.REDUCTIONS, Reduction.NONE),
        (tensor_pb2.Dtype, convert.OUTPUT_DTYPES, TensorDType.FLOAT32),
        (common_pb2.TokenSelectionMode, convert.TOKEN_MODES, TokenMode.UNSPECIFIED),
        (explain_pb2.AttributionBaseline, convert_explain._BASELINES, Baseline.BLACK),
        (features_pb2.FeatureObjective, convert_features._OBJECTIVES, Objective.PATCH_MEAN),
    ],
)
def test_each_wire_value_maps_to_the_core_member_of_its_name(
    wire: object, core: dict[int, Enum], default: Enum
) -> None:
    assert core[0] is default
    names = short_names(wire)  # type: ignore[arg-type]
    for number, member in core.items():
        if number:
            assert names[str(member.value)] == number


def test_core_members_go_back_to_their_own_wire_names() -> None:
    back = core_to_wire(explain_pb2.AttributionBaseline, Baseline)
    assert back == {
        Baseline.BLACK: explain_pb2.ATTRIBUTION_BASELINE_BLACK,
        Baseline.BLURRED: explain_pb2.ATTRIBUTION_BASELINE_BLURRED,
        Baseline.NOISE: explain_pb2.ATTRIBUTION_BASELINE_NOISE,
    }


def test_a_core_member_the_wire_lacks_fails_when_the_table_is_built() -> None:
    class Extra(Enum):
        BLACK = "black"
        SEPIA = "sepia"

    with pytest.raises(KeyError, match="sepia"):
        wire_to_core(explain_pb2.AttributionBaseline, Extra)
