"""LLM-as-judge win rate against a real local fake OpenAI-compatible chat server."""

import json
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rayalign.eval.judge import JudgeError, JudgeSettings, judge_items, win_rates

ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


def chat_reply(content, status=200):
    return status, json.dumps({"id": "x", "object": "chat.completion", "model": "judge",
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}]})


def prefers_correct(request):
    """Deterministic judge: prefers the answer containing "correct"; a tie when both or neither do."""
    answers = dict(ANSWER.findall(request["messages"][-1]["content"]))
    a, b = ("correct" in answers[key] for key in "AB")
    return chat_reply("Comparing both answers. " + ("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]"))


@pytest.fixture
def serve():
    """serve(rule) -> (base URL, calls): rule(request body) -> (status, body text); calls records (headers, body)."""
    servers = []

    def start(rule):
        calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                calls.append((dict(self.headers), body))
                status, text = rule(body) if self.path == "/v1/chat/completions" else (404, "no such route")
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", calls

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def settings(url, **overrides):
    return JudgeSettings(url=url, model="judge", **{"timeout_s": 5.0, "backoff_s": 0.01, **overrides})


def item(prompt_id, lang, response, reference="a reference", prompt="a question?"):
    return {"prompt_id": prompt_id, "lang": lang, "prompt": prompt, "response": response, "reference": reference}


def test_win_rate_per_language_matches_a_hand_count(serve):
    url, calls = serve(prefers_correct)
    items = [item("e1", "en", "correct answer", "wrong"),  # 1
             item("e2", "en", "meh", "correct"),  # 0
             item("e3", "en", "correct", "also correct"),  # tie 0.5
             item("e4", "en", "nope", "nah"),  # tie 0.5
             item("d1", "de", "korrekt, correct", "falsch"),  # 1
             item("d2", "de", "correct", "x"),  # 1
             item("d3", "de", "x", "correct")]  # 0
    progress = []
    judged = judge_items(items, settings(url, max_workers=3), progress=lambda *p: progress.append(p))

    assert [row["prompt_id"] for row in judged] == ["e1", "e2", "e3", "e4", "d1", "d2", "d3"]
    assert [row["score"] for row in judged] == [1.0, 0.0, 0.5, 0.5, 1.0, 1.0, 0.0]
    assert judged[0]["verdicts"] == ["A", "B"] and judged[1]["verdicts"] == ["B", "A"]
    assert judged[2]["verdicts"] == ["tie", "tie"]
    assert "response" not in judged[0] and judged[0]["lang"] == "en"
    assert win_rates(judged) == {"de": (2 / 3, 3), "en": (0.5, 4), "all": (4 / 7, 7), "invalid": (0.0, 0)}
    assert len(calls) == 14 and progress[-1] == (7, 7) and len(progress) == 7
    body = calls[0][1]
    assert body["model"] == "judge" and body["temperature"] == 0 and 0 < body["max_tokens"] <= 1024
    assert "a question?" in body["messages"][-1]["content"] and "language" in body["messages"][0]["content"]


def test_position_biased_judge_cancels_out_with_swap(serve):
    url, calls = serve(lambda request: chat_reply("A looks better. [[A]]"))
    items = [item("p1", "en", "one"), item("p2", "ru", "two")]
    swapped = judge_items(items, settings(url))
    assert [row["score"] for row in swapped] == [0.5, 0.5] and swapped[0]["verdicts"] == ["A", "A"]
    unswapped = judge_items(items, settings(url, swap=False))
    assert [row["score"] for row in unswapped] == [1.0, 1.0] and unswapped[0]["verdicts"] == ["A"]
    assert len(calls) == 4 + 2


def test_unparseable_replies_are_invalid_and_excluded(serve):
    def rule(request):
        text = request["messages"][-1]["content"]
        if "???" in text:
            return chat_reply("I cannot decide. [[D]] [A]")
        if "flaky" in dict(ANSWER.findall(text))["A"]:
            return chat_reply("")
        return prefers_correct(request)

    url, _ = serve(rule)
    items = [item("ok", "en", "correct", "no"), item("bad", "en", "x", prompt="???"),
             item("half", "de", "flaky but correct", "no")]
    judged = judge_items(items, settings(url))
    assert judged[1]["score"] is None and judged[1]["verdicts"] == ["invalid", "invalid"]
    assert judged[2]["score"] == 1.0 and judged[2]["verdicts"] == ["invalid", "B"]
    assert win_rates(judged) == {"de": (1.0, 1), "en": (1.0, 1), "all": (1.0, 2), "invalid": (1 / 3, 1)}
    only_invalid = win_rates(judged[1:2])
    assert math.isnan(only_invalid["en"][0]) and only_invalid["en"][1] == 0 and only_invalid["invalid"] == (1.0, 1)


def test_the_last_verdict_marker_counts(serve):
    url, _ = serve(lambda request: chat_reply("[[A]] would be wrong; [[B]] is right. Final: [[C]]"))
    assert judge_items([item("p", "en", "r")], settings(url, swap=False))[0]["verdicts"] == ["tie"]


def test_api_key_is_sent_as_bearer_token(serve, monkeypatch):
    url, calls = serve(prefers_correct)
    judge_items([item("p", "en", "r")], settings(url, api_key="sekrit", swap=False))
    assert calls[-1][0]["Authorization"] == "Bearer sekrit"
    monkeypatch.setenv("RAYALIGN_JUDGE_API_KEY", "from-env")
    judge_items([item("p", "en", "r")], settings(url, swap=False))
    assert calls[-1][0]["Authorization"] == "Bearer from-env"
    monkeypatch.delenv("RAYALIGN_JUDGE_API_KEY")
    judge_items([item("p", "en", "r")], settings(url, swap=False))
    assert "Authorization" not in calls[-1][0]


def test_server_errors_are_retried_then_succeed(serve):
    failures = iter([(500, "boom"), (503, "busy")])
    url, calls = serve(lambda request: next(failures, None) or chat_reply("[[A]]"))
    judged = judge_items([item("p", "en", "r")], settings(url, swap=False))
    assert judged[0]["verdicts"] == ["A"] and len(calls) == 3


def test_persistent_server_errors_raise_after_the_retries(serve):
    url, calls = serve(lambda request: (429, "slow down"))
    with pytest.raises(JudgeError, match=r"/v1/chat/completions: HTTP 429: 'slow down' \(after 3 attempts\)"):
        judge_items([item("p", "en", "r")], settings(url, max_retries=2))
    assert len(calls) == 3


def test_client_error_raises_at_once_naming_url_and_status(serve):
    url, calls = serve(lambda request: (400, '{"error": "model judge does not exist"}'))
    with pytest.raises(JudgeError) as raised:
        judge_items([item("p", "en", "r")], settings(url))
    assert f"{url}/chat/completions" in str(raised.value) and "HTTP 400" in str(raised.value)
    assert "does not exist" in str(raised.value) and len(calls) == 1


def test_malformed_replies_raise(serve):
    url, _ = serve(lambda request: (200, "<html>not json</html>"))
    with pytest.raises(JudgeError, match="not JSON.*not json"):
        judge_items([item("p", "en", "r")], settings(url))
    url, _ = serve(lambda request: (200, '{"data": []}'))
    with pytest.raises(JudgeError, match=r"choices\[0\]\.message\.content"):
        judge_items([item("p", "en", "r")], settings(url))


def test_refused_connection_raises_naming_the_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(JudgeError, match=re.escape(f"{url}/chat/completions: unreachable")):
        judge_items([item("p", "en", "r")], settings(url, max_retries=1))


def test_a_judge_url_without_host_or_server_is_refused_before_any_work(serve):
    """`http://` and a port nobody listens on failed only after generation and scoring (34 s here, hours on a
    real model); a blank model name was accepted."""
    with pytest.raises(JudgeError, match=re.escape("judge url: no host in 'http://'")):
        JudgeSettings(url="http://", model="m")
    with pytest.raises(JudgeError, match=re.escape("judge model: expected the served model name, got ' '")):
        JudgeSettings(url="http://h/v1", model=" ")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(JudgeError, match=re.escape(f"nothing answers at 127.0.0.1:{port}")):
        settings(f"http://127.0.0.1:{port}/v1").check_reachable()
    url, calls = serve(prefers_correct)
    settings(url).check_reachable()
    assert calls == []  # a connection, no request


@pytest.mark.parametrize("reference", ["", None, "   "])
def test_missing_reference_is_rejected_before_any_request(serve, reference):
    url, calls = serve(prefers_correct)
    items = [item("fine", "en", "r"), item("q-17", "de", "r", reference=reference)]
    with pytest.raises(JudgeError, match=r"'q-17'.*`reference` \(or `output`\) field"):
        judge_items(items, settings(url))
    assert calls == []


@pytest.mark.parametrize("overrides, field", [({"url": "localhost:8000/v1"}, "url"),
                                              ({"url": "http://h/v1/chat/completions"}, "url"),
                                              ({"model": ""}, "model"), ({"max_workers": 0}, "max_workers")])
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(JudgeError, match=f"judge {field}: expected"):
        JudgeSettings(**{"url": "http://h/v1", "model": "m", **overrides})
