"""The request-field declarations (vitscope_server.transport.fields) cover every field of
every request message, name nothing that does not exist, and their grammars take ASCII
digits only."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool
from support.fuzzing import SERVICES

from vitscope.oip import grpc_predict_v2_pb2 as oip
from vitscope.v1 import explain_pb2 as epb
from vitscope_server.core.runtime.errors import InvalidArgument
from vitscope_server.transport import fields
from vitscope_server.transport.fields.grammars import INDEX_LIST, POSITION_LIST, SITE


def _reachable() -> set[str]:
    return {
        field.full_name
        for service in SERVICES
        for method in service.methods
        for field in fields.declared_fields(method.input_type)
    }


def test_every_request_field_has_one_declaration() -> None:
    missing = sorted(_reachable() - set(fields.FIELDS))
    assert not missing, f"declare these in vitscope_server/transport/fields: {missing}"


def test_no_declaration_names_a_field_that_is_not_requested() -> None:
    pool = descriptor_pool.Default()
    stale = sorted(set(fields.FIELDS) - _reachable())
    assert not stale, stale
    for name in fields.FIELDS:
        assert pool.FindFieldByName(name).full_name == name


@pytest.mark.parametrize(
    "text", ["--1:2", "1:--2", "\u00b2:0", "\u0661:0", "\uff11:0", "1:2:3", "0:0,", "-1:0", ""]
)
def test_positions_that_int_would_take_or_choke_on(text: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        POSITION_LIST.parse(text, 'parameters["positions"]')
    assert refused.value.field == 'parameters["positions"]'
    assert "row:col patch positions" in refused.value.description


def test_lists_parse_with_spaces_around_items() -> None:
    assert POSITION_LIST.parse(" 0:0 , 3:2", "p") == ((0, 0), (3, 2))
    assert INDEX_LIST.parse("0, 5,9 ", "p") == (0, 5, 9)
    for text in ["1e3", "1_000", "+1", "\u0661", "9" * 10, "1,,2"]:
        assert not INDEX_LIST.matches(text), text


def test_site_names_are_ascii_dotted_names() -> None:
    assert SITE.matches("blocks.3.attn.qkv") and SITE.matches("embed")
    for text in ["blocks..0", ".out", "blocks.\u0663.out", "a b", "blocks.0.out\n"]:
        assert not SITE.matches(text), text


def test_a_request_is_refused_at_the_first_field_past_its_declaration() -> None:
    request = epb.ExplainRequest(
        methods=[
            epb.ExplanationMethodRequest(
                integrated_gradients=epb.IntegratedGradientsParameters(blur_sigma=1e308)
            )
        ]
    )
    with pytest.raises(InvalidArgument) as refused:
        fields.check(request)
    assert refused.value.field == "methods[0].integrated_gradients.blur_sigma"
    assert "finite, > 0 and <= 10000" in refused.value.description


def test_parameters_name_their_key() -> None:
    output = oip.ModelInferRequest.InferRequestedOutputTensor(
        name="blocks.0.out", parameters={"color": oip.InferParameter(string_param="red")}
    )
    with pytest.raises(InvalidArgument) as refused:
        fields.check(oip.ModelInferRequest(outputs=[output]))
    assert refused.value.field == 'outputs[0].parameters["color"]'
    assert "positions" in refused.value.description


def test_site_names_take_an_sae_suffix() -> None:
    for text in ["blocks.3.out@sae:resid3-topk", "blocks.3.out@sae:a.recon", "final@sae:x.error"]:
        assert SITE.matches(text), text
    for text in ["blocks.3.out@sae:", "blocks.3.out@sae:a.other", "blocks.3.out@x:a", "@sae:a"]:
        assert not SITE.matches(text), text
