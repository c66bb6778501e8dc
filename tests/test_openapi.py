"""The OpenAPI document: a valid 3.1 spec, generated from the request models, covering every
route, and describing the responses the API really sends."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from api.app import create_app
from api.openapi import REF
from api.submission import GENERATION_FIELDS, SAMPLING_FIELDS, WEBHOOK_FIELDS
from common.schemas import JobRequest
from common.settings import Settings

VIDEO = {"url": "https://93.184.215.14/a.mp4"}


@pytest.fixture()
def app(local_settings: Settings) -> Flask:
    return create_app(local_settings)


@pytest.fixture()
def spec(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _conforms(spec: dict[str, Any], model: str, body: Any) -> None:
    schema = {"$ref": REF.format(model=model), "components": spec["components"]}
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in Draft202012Validator(schema).iter_errors(body)]
    assert not errors, (model, errors, body)


def test_the_document_is_a_valid_openapi_3_1_spec(spec: dict[str, Any]) -> None:
    validate(spec)
    assert spec["openapi"] == "3.1.0"


def test_every_route_is_in_the_spec_and_nothing_else(app: Flask, spec: dict[str, Any]) -> None:
    routes = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert routes == documented


def test_request_bodies_come_from_the_validating_models(spec: dict[str, Any]) -> None:
    # The JSON body is JobRequest's own schema, not a copy kept by hand.
    generated = JobRequest.model_json_schema(ref_template=REF)
    generated.pop("$defs", None)
    assert spec["components"]["schemas"]["JobRequest"] == generated
    content = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": REF.format(model="JobRequest")}
    # The multipart form lists exactly the fields the parser accepts.
    form = content["multipart/form-data"]["schema"]["properties"]
    assert set(form) == {
        "question", "prompt", "videos", "images", *SAMPLING_FIELDS, *GENERATION_FIELDS, *WEBHOOK_FIELDS
    }  # fmt: skip
    assert form["num_frames"] == spec["components"]["schemas"]["Sampling"]["properties"]["num_frames"]


def test_responses_conform_to_the_documented_schemas(client: FlaskClient, spec: dict[str, Any]) -> None:
    created = client.post("/v1/jobs", json={"question": "What?", "videos": [VIDEO]})
    assert created.status_code == 202
    _conforms(spec, "JobView", created.get_json())
    job_id = created.get_json()["id"]
    _conforms(spec, "JobView", client.get(f"/v1/jobs/{job_id}").get_json())
    _conforms(spec, "JobPage", client.get("/v1/jobs?limit=5").get_json())
    _conforms(spec, "JobView", client.delete(f"/v1/jobs/{job_id}").get_json())
    uploaded = client.post(
        "/v1/jobs",
        data={"question": "What?", "num_frames": "3", "videos": [(io.BytesIO(b"not a video"), "a.mp4")]},
        content_type="multipart/form-data",
    )
    _conforms(spec, "JobView", uploaded.get_json())
    for path, method, response in (
        ("/v1/jobs", "post", client.post("/v1/jobs", json={"question": "", "videos": [], "bogus": 1})),
        ("/v1/jobs/{job_id}", "get", client.get("/v1/jobs/0123456789abcdef0123456789abcdef")),
        ("/v1/jobs/{job_id}", "delete", client.delete(f"/v1/jobs/{job_id}")),  # already cancelled: 409
    ):
        assert response.status_code >= 400
        assert str(response.status_code) in spec["paths"][path][method]["responses"]
        _conforms(spec, "ErrorResponse", response.get_json())
    _conforms(spec, "Health", client.get("/healthz").get_json())
    _conforms(spec, "Readiness", client.get("/readyz").get_json())


def test_docs_page_renders_every_operation_and_schema(client: FlaskClient, spec: dict[str, Any]) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    for item in spec["paths"].values():
        for operation in item.values():
            assert f'id="{operation["operationId"]}"' in page
    for name in spec["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    assert "<script" not in page  # nothing to fetch: it renders on a closed network


def test_openai_compatible_routes_answer_in_their_documented_shapes(client: FlaskClient, spec: dict[str, Any]) -> None:
    listed = client.get("/v1/models").get_json()
    _conforms(spec, "ModelList", listed)
    _conforms(spec, "ModelCard", client.get(f"/v1/models/{listed['data'][0]['id']}").get_json())
    for path, response in (
        ("/v1/chat/completions", client.post("/v1/chat/completions", json={"model": "nope", "messages": []})),
        ("/v1/chat/completions", client.post("/v1/chat/completions", json={"model": listed["data"][0]["id"], "n": 3})),
        ("/v1/models/{model_id}", client.get("/v1/models/nope")),
    ):
        method = "post" if path == "/v1/chat/completions" else "get"
        assert str(response.status_code) in spec["paths"][path][method]["responses"]
        _conforms(spec, "OpenAIError", response.get_json())
