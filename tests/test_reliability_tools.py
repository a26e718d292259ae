"""The fuzz and soak drivers on plain data (their runs against a live server are `make fuzz` / `make soak`)."""

from __future__ import annotations

import jsonschema
import pytest

from loadtests.reliability.fuzz import ENDPOINTS, openapi_spec, request_schemas
from loadtests.reliability.soak import bad_requests


@pytest.fixture(scope="module")
def specs():
    schemas = request_schemas()
    return {stream: openapi_spec(schemas, stream, 4, "m") for stream in (False, True)}


def _validator(spec: dict, name: str):
    schema = spec["components"]["schemas"][name] | {"components": spec["components"]}
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.integration  # vLLM's request schemas
@pytest.mark.parametrize("stream", [False, True])
def test_fuzz_spec_bounds_output_and_fixes_stream(specs, stream):
    spec = specs[stream]
    assert set(spec["paths"]) == set(ENDPOINTS)
    completions = _validator(spec, "CompletionRequest")
    ok = {"model": "m", "prompt": "Hi", "max_tokens": 4, "stream": stream}
    assert completions.is_valid(ok)
    for bad in ({"max_tokens": 5}, {"stream": not stream}, {"model": "other"}, {"prompt": [99999999]},
                {"not_a_field": 1}):
        assert not completions.is_valid(ok | bad), bad
    assert not completions.is_valid({k: v for k, v in ok.items() if k != "max_tokens"})
    chat = _validator(spec, "ChatCompletionRequest")
    assert chat.is_valid({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                          "stream": stream})


def test_soak_bad_requests_name_their_expected_status():
    cases = bad_requests("m")
    assert len({name for name, *_ in cases}) == len(cases)
    assert all(statuses and all(200 <= s < 500 for s in statuses) for *_, statuses in cases)
