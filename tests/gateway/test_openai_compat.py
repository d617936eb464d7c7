"""The OpenAI API as its clients use it: content parts, OpenAI's error for invalid JSON, the
model endpoints and unknown models, top_k, and a clear 400 for parameters the model cannot
honour (logit bias and penalties are honoured: tests/gateway/test_openai_sampling.py). Over the honest in-memory backends, plus one check through the real policy service."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from palm_rlhf.chat import format_chat
from services.common.feedback_store import open_store
from services.gateway.app import GatewayConfig, create_app
from services.gateway.backends import GrpcBackends, SamplingOptions

from .conftest import E2E_KEY, REPO, RecordingBackends, ThreadServer

MESSAGES = [{"role": "user", "content": "How was your day?"}]


@pytest.fixture
def backends() -> RecordingBackends:
    return RecordingBackends()


def make_client(backends, store, **config) -> TestClient:
    return TestClient(create_app(backends, store, GatewayConfig(**config)))


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "palm-rlhf", "messages": MESSAGES, **body})


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --------------------------------------------------------------------------------------------
# content parts


def test_text_content_parts_are_joined_with_newlines_into_the_prompt_and_the_log(backends, sqlite_store):
    client = make_client(backends, sqlite_store)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "How was"}, {"type": "text", "text": "your day?"}]},
    ]
    r = client.post("/v1/chat/completions", json={"messages": messages, "seed": 4})
    assert r.status_code == 200, r.text
    rec = sqlite_store.get_completion(r.json()["id"])
    # the log keeps each message's text as the model read it: parts joined with "\n"
    assert rec.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How was\nyour day?"},
    ]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How was\nyour day?"}]
    assert rec.prompt_text == format_chat(plain) == "System: Be brief.\nUser: How was your day?\nAssistant:"
    # the same conversation sent as strings is the same prompt, so the same answer for a seed
    again = client.post("/v1/chat/completions", json={"messages": plain, "seed": 4})
    assert again.json()["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]
    view = client.get(f"/v1/completions/{rec.id}").json()
    assert view["messages"] == rec.messages


def test_non_text_content_parts_are_a_400_naming_the_message_content(backends, sqlite_store):
    client = make_client(backends, sqlite_store)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    for i, part in enumerate((image, audio)):
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]},
        ]
        err = error_of(client.post("/v1/chat/completions", json={"messages": messages}), 400)
        assert err["type"] == "invalid_request_error" and err["param"] == "messages.1.content", err
        assert f"content part 1 has type '{part['type']}'" in err["message"], err
        assert "text" in err["message"]
    for content, says in (
        ([], "non-empty array"),
        ([{"type": "text"}], "needs a string 'text'"),
        (["just a string"], "must be an object with a 'type'"),
    ):
        err = error_of(chat(client, messages=[{"role": "user", "content": content}]), 400)
        assert err["param"] == "messages.0.content" and says in err["message"], err
    assert backends.calls == [] and sqlite_store.counts()["completions"] == 0


def test_openapi_documents_content_as_string_or_text_parts(backends, sqlite_store):
    spec = make_client(backends, sqlite_store).get("/openapi.json").json()
    content = spec["components"]["schemas"]["ChatMessage"]["properties"]["content"]
    kinds = {s["type"] for s in content["anyOf"]}
    assert kinds == {"string", "array"}
    array = next(s for s in content["anyOf"] if s["type"] == "array")
    assert array["items"]["properties"]["type"]["enum"] == ["text"]


# --------------------------------------------------------------------------------------------
# invalid JSON


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"model": }', "Expecting value: line 1 column 11 (char 10)"),
        (b"{not json", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        (b'{"messages": [\n  {"role": "us', "Unterminated string starting at: line 2 column 12 (char 26)"),
    ],
)
def test_invalid_json_gets_openais_error(backends, sqlite_store, body, reason):
    client = make_client(backends, sqlite_store)
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": f"We could not parse the JSON body of your request: {reason}",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    # feedback posts share the handler
    r = client.post("/v1/feedback", content=body, headers={"content-type": "application/json"})
    assert error_of(r, 400)["message"] == f"We could not parse the JSON body of your request: {reason}"


# --------------------------------------------------------------------------------------------
# models


def test_model_endpoints_and_unknown_models(backends, sqlite_store):
    client = make_client(backends, sqlite_store)
    assert client.get("/v1/models").json() == {
        "object": "list",
        "data": [{"id": "palm-rlhf", "object": "model", "created": 0, "owned_by": "palm-rlhf"}],
    }
    for name in ("palm-rlhf", "palm"):
        r = client.get(f"/v1/models/{name}")
        assert r.status_code == 200 and r.json() == {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "palm-rlhf",
        }
    for name in ("gpt-4o", "PALM", "palm-rlhf-2", "org/palm"):
        err = error_of(client.get(f"/v1/models/{name}"), 404)
        assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error", err
        assert f"'{name}'" in err["message"] and "palm-rlhf" in err["message"]

    # a chat completion naming an unknown model is a 404 before anything is generated or stored
    for stream in (False, True):
        err = error_of(chat(client, model="gpt-4o", stream=stream), 404)
        assert (err["code"], err["param"]) == ("model_not_found", "model"), err
    assert backends.calls == [] and sqlite_store.counts()["completions"] == 0
    # the served id, its alias, and no model at all (the served one) are answered and echoed
    for body, echoed in (({"model": "palm-rlhf"}, "palm-rlhf"), ({"model": "palm"}, "palm"), ({}, "palm-rlhf")):
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
        assert r.status_code == 200 and r.json()["model"] == echoed, r.text
        assert sqlite_store.get_completion(r.json()["id"]).model == echoed


def test_model_names_in_readme_docs_and_the_web_page_are_served(backends, sqlite_store):
    """Every model name the README, the docs and the web page send is one the gateway knows."""
    sources = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "services/gateway/static").glob("*.js")]
    pattern = re.compile(r"""["']?model["']?\s*[:=]\s*["']([\w.\-/]+)["']""")
    names = {m for path in sources for m in pattern.findall(path.read_text())}
    assert {"palm", "palm-rlhf"} <= names, names  # the scan finds what is there
    client = make_client(backends, sqlite_store)
    for name in sorted(names):
        assert client.get(f"/v1/models/{name}").status_code == 200, name
        assert chat(client, model=name).status_code == 200, name


def test_the_served_name_and_aliases_are_configurable(backends, sqlite_store):
    client = make_client(backends, sqlite_store, model_name="palm-demo", model_aliases=("demo",))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["palm-demo"]
    assert chat(client, model="demo").status_code == 200
    assert chat(client, model="palm-demo").status_code == 200
    err = error_of(chat(client, model="palm"), 404)
    assert "'palm-demo' (also accepted as 'demo')" in err["message"]


def test_openai_client_retrieves_the_model_and_raises_not_found(backends, sqlite_store):
    app = create_app(backends, sqlite_store, GatewayConfig(api_keys=["sk-test"]))
    with ThreadServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        model = client.models.retrieve("palm-rlhf")
        assert (model.id, model.object, model.owned_by) == ("palm-rlhf", "model", "palm-rlhf")
        assert client.models.retrieve("palm").id == "palm"
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve("gpt-4o")
        assert e.value.code == "model_not_found" and e.value.status_code == 404
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert e.value.code == "model_not_found" and e.value.param == "model"
        # content parts and top_k (in extra_body) as the client sends them
        resp = client.chat.completions.create(
            model="palm",
            messages=[{"role": "user", "content": [{"type": "text", "text": "How was your day?"}]}],
            seed=3,
            extra_body={"top_k": 5},
        )
        assert resp.model == "palm" and backends.params[-1].top_k == 5
        assert sqlite_store.get_completion(resp.id).messages == MESSAGES
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="palm-rlhf",
                messages=MESSAGES,
                tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
            )
        assert e.value.param == "tools"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="palm-rlhf",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            )
        assert e.value.param == "messages.0.content"


# --------------------------------------------------------------------------------------------
# sampling parameters


def test_top_k_is_passed_to_the_policy_and_recorded(backends, sqlite_store):
    client = make_client(backends, sqlite_store)
    r = chat(client, top_k=1, temperature=1.0, seed=2)
    assert r.status_code == 200, r.text
    assert backends.params[-1].top_k == 1 and backends.params[-1].temperature == 1.0
    assert sqlite_store.get_completion(r.json()["id"]).sampling["top_k"] == 1
    r = chat(client, top_k=3, stream=True, seed=2)  # the streaming path too
    assert r.status_code == 200 and backends.params[-1].top_k == 3
    chat(client)
    assert backends.params[-1].top_k is None  # unset: the policy's default (off)
    for bad in (-1, 1.5, "two"):
        assert error_of(chat(client, top_k=bad), 400)["param"] == "top_k"
    # and the policy's gRPC request carries it (unset when not given)
    req = GrpcBackends._request(None, "User: hi\nAssistant:", 2, SamplingOptions(top_k=1, temperature=1.0))
    assert req.params.HasField("top_k") and req.params.top_k == 1
    assert not GrpcBackends._request(None, "x", 1, SamplingOptions()).params.HasField("top_k")


UNSUPPORTED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),
    ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("function_call", {"name": "f"}),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
]


@pytest.mark.parametrize(("param", "value"), UNSUPPORTED)
def test_parameters_the_model_cannot_honour_are_a_400_naming_them(backends, sqlite_store, param, value):
    client = make_client(backends, sqlite_store)
    err = error_of(chat(client, **{param: value}), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"].startswith(f"{param}: ") and "not supported" in err["message"], err
    assert backends.calls == []


def test_the_off_values_of_those_parameters_are_accepted(backends, sqlite_store):
    client = make_client(backends, sqlite_store)
    off = {
        "tools": [],
        "tool_choice": "none",
        "functions": [],
        "function_call": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "user": "someone",  # other OpenAI fields stay ignored
        "parallel_tool_calls": False,
    }
    r = chat(client, **off)
    assert r.status_code == 200, r.text
    r = chat(client, **{k: None for k in off})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------------
# through the real policy service


def test_top_k_1_is_greedy_through_the_real_policy(stack):
    """top_k=1 keeps only the most likely token, so sampling at temperature 1 is greedy decoding:
    the same tokens as temperature 0, whatever the seed."""
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=E2E_KEY, max_retries=0)
    messages = [{"role": "user", "content": "Tell me about the sea."}]

    def tokens(**kw) -> tuple[str, list[int]]:
        resp = client.chat.completions.create(model="palm-rlhf", messages=messages, max_tokens=16, **kw)
        with open_store(f"sqlite:///{stack.db_path}") as store:
            rec = store.get_completion(resp.id)
        return resp.choices[0].message.content, rec.candidates[0].token_ids

    greedy = tokens(temperature=0, seed=1)
    assert len(greedy[1]) >= 2, greedy  # enough tokens for the comparisons below to mean something
    assert tokens(temperature=1.0, seed=1, extra_body={"top_k": 1}) == greedy
    assert tokens(temperature=1.0, seed=2, extra_body={"top_k": 1}) == greedy
    assert tokens(temperature=1.0, seed=987654, extra_body={"top_k": 1}) == greedy
    # without top_k, temperature 1 samples (so the equalities above are top_k's doing)
    sampled = [tokens(temperature=1.0, seed=s)[1] for s in (1, 2)]
    assert any(t != greedy[1] for t in sampled), (greedy, sampled)
