"""Generation parameters of the sidecar's routes: a temperature must be a finite number in range."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from auditor.server.errors import BadRequestError
from auditor.server.proxy import GenerateRequest, _number


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "-0.1", "2.5"])
def test_temperature_out_of_range_or_not_finite_is_refused(raw: str) -> None:
    body = json.loads(f'{{"prompt": "hi", "temperature": {raw}}}')  # what a JSON body may hold
    with pytest.raises(BadRequestError, match="temperature must be a number between 0 and 2, got"):
        _number(body, "temperature", 0.0, 0.0, 2.0)  # the OpenAI-compatible routes
    with pytest.raises(ValidationError, match="temperature"):
        GenerateRequest.model_validate(body)  # /v1/generate


def test_a_finite_temperature_in_range_is_kept() -> None:
    assert _number({"temperature": 0.7}, "temperature", 0.0, 0.0, 2.0) == 0.7
    assert _number({}, "temperature", 0.0, 0.0, 2.0) == 0.0
    assert GenerateRequest.model_validate({"prompt": "hi", "temperature": 1.5}).temperature == 1.5
