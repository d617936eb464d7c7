"""Schemathesis fuzzes the served OpenAPI schema: whatever it sends, the gateway answers
without a 5xx, with a documented status code, content type and body shape.

The gateway runs in-process over the honest in-memory backends (the gateway is what is under
test) and a real SQLite store holding one completion, so feedback calls can also succeed."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from services.common.feedback_store import open_store
from services.gateway.app import GatewayConfig, create_app

from .conftest import FakeBackends, make_completion

_tmp = tempfile.TemporaryDirectory(prefix="gateway-fuzz-")
_store = open_store(f"sqlite:///{Path(_tmp.name) / 'feedback.db'}")
_store.add_completion(make_completion("chatcmpl-fuzz", best_of=3))
app = create_app(FakeBackends(), _store, GatewayConfig(max_body_bytes=64 * 1024))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_and_responses_match_the_schema(case):
    case.call_and_validate(checks=CHECKS)
