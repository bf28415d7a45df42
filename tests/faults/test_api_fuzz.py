"""The serving API fuzzed on 127.0.0.1: schemathesis drives every operation of the OpenAPI spec the server publishes
(the chat request body included: serve.chat_request_schema), and hypothesis throws raw junk bodies at
/v1/chat/completions. No request may get a 5xx; every error is an OpenAI-style JSON error; the key is required."""
from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st

from nanochat.serve import BackgroundServer, Limits, create_app
from nanochat.store import open_store
from tests.fixtures import fuzz, make_base_checkpoint, make_tokenizer

KEY = "sk-fuzz-key"
LIMITS = Limits(max_messages=6, max_message_chars=400, max_total_chars=1000, max_tokens=8, max_n=2, max_body_bytes=20_000)
ERROR_STATUSES = {400, 401, 404, 405, 413, 422, 429}

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    uri = f"file://{tmp_path_factory.mktemp('api')}/store"
    store = open_store(uri)
    make_base_checkpoint(store, make_tokenizer(store, vocab_size=300), depth=1, seq_len=64)
    with BackgroundServer(create_app(uri, api_key=KEY, limits=LIMITS, devices=["cpu"])) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def api_schema(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()  # the chat body's schema comes from the server itself
    assert spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"] == ["messages"]
    spec["servers"] = [{"url": server.url}]
    return schemathesis.openapi.from_dict(spec)


def check_response(response):
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["message"], body
        assert response.status_code in ERROR_STATUSES, response.status_code


def test_every_operation_answers_without_a_server_error(api_schema, server):
    """Positive and negative cases of every operation in the spec, with and without the key. (Driven through
    schemathesis' strategies: its pytest plugin does not run on pytest 9 yet.)"""
    from schemathesis import GenerationMode
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "GET /v1/models", "GET /healthz"}
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                       for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    seen = set()

    @fuzz(80)
    @given(case=cases)
    def run(case):
        seen.add(case.operation.label)
        for headers in ({"Authorization": f"Bearer {KEY}"}, {}):
            response = case.call(base_url=server.url, headers=headers, timeout=60)
            check_response(response)
            if not headers and case.path.startswith("/v1/"):
                assert response.status_code == 401
    run()
    assert "POST /v1/chat/completions" in seen


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
NEAR_VALID = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": JSON}), min_size=0, max_size=7)},
    optional={"max_tokens": JSON, "n": JSON, "temperature": JSON, "top_p": JSON, "top_k": JSON, "stop": JSON,
              "stream": JSON, "seed": JSON, "stream_options": JSON})


VALID = st.fixed_dictionaries({"messages": st.lists(st.text(max_size=60), min_size=0, max_size=3).map(
    lambda turns: [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns + ["hi"])])},
    optional={"max_tokens": st.integers(-2, 12), "n": st.integers(0, 3), "temperature": st.floats(-1, 3), "top_k": st.integers(0, 300),
              "top_p": st.floats(0, 1.5), "seed": st.integers(-1, 2**40), "stream": st.booleans(),
              "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=5)),
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})})


def test_junk_bodies_get_4xx_json_errors_never_5xx(server):
    statuses = []

    @fuzz(150)
    @given(body=st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode()),
                          NEAR_VALID.map(lambda v: json.dumps(v).encode()), VALID.map(lambda v: json.dumps(v).encode()),
                          st.integers(20_001, 60_000).map(lambda n: b'{"messages": "' + b"a" * n + b'"}')))
    def run(body):
        response = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        check_response(response)
        statuses.append(response.status_code)
        if len(body) > LIMITS.max_body_bytes:
            assert response.status_code == 413
    run()
    assert {200, 400, 413} <= set(statuses), sorted(set(statuses))  # the fuzz reached generation and every guard
