"""Property-based requests generated from the project's own /openapi.json (Schemathesis).

Every operation gets a bounded number of generated requests, valid and invalid, with a real
token; no response may be a 5xx or break the documented schema (status code, content type, body).
"""
import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lightx2v_site.wsgi import application

EXAMPLES_PER_OPERATION = 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# Loaded when the module is collected (serving the schema needs no database).
schema = schemathesis.openapi.from_wsgi("/openapi.json", application)


@pytest.fixture(autouse=True)
def keep_test_connection_open():
    """Keep the test's database connection (and its transaction) across WSGI calls, as Django's test client does."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def token(make_api, settings):
    settings.LIGHTX2V_MAX_UNFINISHED_PER_USER = 10_000  # the cap has its own tests; here it would only 429
    return make_api("fuzzer").raw_key


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_generated_request_gets_a_5xx_or_an_undocumented_response(case, token):
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)
