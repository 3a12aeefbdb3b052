"""Optional LLM-as-judge win rate of policy responses against the prompts' reference answers.

The judge is any OpenAI-compatible chat server the user runs (e.g. `vllm serve <judge model>`), reached with the
standard library only. Each item is judged pairwise (MT-bench style), by default in both orders to cancel position
bias. The verdict is the last `[[A]]`/`[[B]]`/`[[C]]` in the reply; anything else is "invalid", never a tie.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

API_KEY_ENV = "RAYALIGN_JUDGE_API_KEY"

SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. Choose the assistant that answers the user's question better. Consider "
    "helpfulness and correctness, and whether the answer is written in the language of the question: an answer in "
    "another language is worse, however good its content. Avoid any position bias: the order in which the answers "
    "are presented must not influence your decision. Do not let the length of the answers influence you. Be as "
    "objective as possible. Give a brief explanation (a few sentences), then end with your final verdict, strictly "
    'in this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie.'
)
USER_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)

VERDICT_PATTERN = re.compile(r"\[\[([ABC])\]\]")
VERDICT_NAMES = {"A": "A", "B": "B", "C": "tie"}
# the policy response's score for a verdict, by the position ("A" or "B") it was shown in
POLICY_SCORE = {"A": {"A": 1.0, "B": 0.0, "tie": 0.5}, "B": {"A": 0.0, "B": 1.0, "tie": 0.5}}
TEXT_KEYS = ("prompt", "response", "reference")
EXCERPT_CHARS = 200


class JudgeError(RuntimeError):
    """The judge cannot be used: bad settings or items, unreachable server, HTTP 4xx, malformed reply."""


@dataclass(frozen=True)
class JudgeSettings:
    url: str  # base URL ending in /v1; requests go to {url}/chat/completions
    model: str  # the served model name
    api_key: str | None = None  # None: read RAYALIGN_JUDGE_API_KEY; sent as "Authorization: Bearer ..." when set
    max_workers: int = 8  # items judged concurrently
    timeout_s: float = 60.0
    max_retries: int = 3  # retries on connection errors, HTTP 429 and 5xx
    swap: bool = True  # judge both orders (response as A, then as B) to cancel position bias
    max_tokens: int = 512
    backoff_s: float = 0.5  # first retry delay, doubled on each further retry

    def __post_init__(self):
        if self.api_key is None:
            object.__setattr__(self, "api_key", os.environ.get(API_KEY_ENV))
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise JudgeError(f"judge url: expected an http(s) base URL ending in /v1, got {self.url!r}")
        if self.url.rstrip("/").endswith("/chat/completions"):
            raise JudgeError(f"judge url: expected the base URL ending in /v1 (without /chat/completions), "
                             f"got {self.url!r}")
        if not urllib.parse.urlsplit(self.url).hostname:
            raise JudgeError(f"judge url: no host in {self.url!r} (expected e.g. http://localhost:8000/v1)")
        if not isinstance(self.model, str) or not self.model.strip():
            raise JudgeError(f"judge model: expected the served model name, got {self.model!r}")
        for name, least in (("max_workers", 1), ("max_retries", 0), ("max_tokens", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < least:
                raise JudgeError(f"judge {name}: expected an integer >= {least}, got {getattr(self, name)!r}")
        for name in ("timeout_s", "backoff_s"):
            if not getattr(self, name) >= 0:
                raise JudgeError(f"judge {name}: expected a number >= 0, got {getattr(self, name)!r}")

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Something answers at the URL's host and port (a TCP connection, no request): checked before an
        evaluation generates anything, rather than after."""
        import socket

        parts = urllib.parse.urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
        except OSError as e:
            raise JudgeError(f"judge url {self.url}: nothing answers at {parts.hostname}:{port} ({e.strerror or e}); "
                             "start the judge server first") from None


def judge_items(items: list[dict], settings: JudgeSettings,
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Judge each item's `response` against its `reference`; per item, in order: the item's keys other than the
    texts (prompt, response, reference), `score` (1 = response better, 0.5 = tie, 0 = reference better, averaged
    over the valid verdicts; None when every verdict is invalid) and `verdicts` (positional, response first shown
    as A). Fails on the first JudgeError; `progress(done, total)` counts judged items."""
    _check_items(items)
    results: list[dict | None] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=settings.max_workers) as pool:
        futures = {pool.submit(_judge_item, item, settings): index for index, item in enumerate(items)}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress(done, len(items))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return results


def win_rates(judged: list[dict]) -> dict[str, tuple[float, int]]:
    """Per language (sorted) and "all": (mean score, items counted) over the items with at least one valid verdict;
    the mean is nan when none counted. "invalid": (share of all items, count) of the items whose every verdict was
    invalid, which are left out of the means."""
    scores_by_lang: dict[str, list[float | None]] = {}
    for row in judged:
        scores_by_lang.setdefault(row["lang"], []).append(row["score"])
    rates = {lang: _mean_of_valid(scores) for lang, scores in sorted(scores_by_lang.items())}
    all_scores = [row["score"] for row in judged]
    rates["all"] = _mean_of_valid(all_scores)
    invalid = all_scores.count(None)
    rates["invalid"] = (invalid / len(judged) if judged else 0.0, invalid)
    return rates


def _mean_of_valid(scores: list[float | None]) -> tuple[float, int]:
    valid = [s for s in scores if s is not None]
    return (sum(valid) / len(valid) if valid else math.nan, len(valid))


def _check_items(items: list[dict]) -> None:
    for index, item in enumerate(items):
        for key in ("prompt_id", "lang"):
            if key not in item:
                raise JudgeError(f"judge items[{index}]: missing {key!r}")
        where = f"judge prompt_id {item['prompt_id']!r} ({item['lang']})"
        reference = item.get("reference")
        if not isinstance(reference, str) or not reference.strip():
            raise JudgeError(f"{where}: no reference answer; the prompt set needs a `reference` (or `output`) field "
                             "to judge against")
        for key in ("prompt", "response"):
            if not isinstance(item.get(key), str):
                raise JudgeError(f"{where}: {key!r} must be a string, got {type(item.get(key)).__name__}")


def _judge_item(item: dict, settings: JudgeSettings) -> dict:
    orders = [("A", item["response"], item["reference"])]
    if settings.swap:
        orders.append(("B", item["reference"], item["response"]))
    verdicts, scores = [], []
    for position, answer_a, answer_b in orders:
        verdict = _ask_judge(settings, item["prompt"], answer_a, answer_b)
        verdicts.append(verdict)
        if verdict != "invalid":
            scores.append(POLICY_SCORE[position][verdict])
    kept = {key: value for key, value in item.items() if key not in TEXT_KEYS}
    return {**kept, "score": sum(scores) / len(scores) if scores else None, "verdicts": verdicts}


def _ask_judge(settings: JudgeSettings, question: str, answer_a: str, answer_b: str) -> str:
    """One pairwise request; returns "A", "B", "tie" or "invalid"."""
    user = USER_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)
    reply = _post_json(settings, {
        "model": settings.model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
        "temperature": 0,
        "max_tokens": settings.max_tokens,
    })
    try:
        content = reply["choices"][0]["message"]["content"] or ""
        if not isinstance(content, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge {settings.endpoint}: expected an OpenAI chat reply with choices[0].message.content, "
                         f"got {_excerpt(json.dumps(reply).encode())}") from None
    found = VERDICT_PATTERN.findall(content)
    return VERDICT_NAMES[found[-1]] if found else "invalid"


def _post_json(settings: JudgeSettings, payload: dict) -> dict:
    """POST with retries on connection errors, 429 and 5xx (exponential backoff); other 4xx fail at once."""
    endpoint, data = settings.endpoint, json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    for attempt in range(settings.max_retries + 1):
        if attempt:
            time.sleep(settings.backoff_s * 2 ** (attempt - 1))
        request = urllib.request.Request(endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=settings.timeout_s) as reply:
                body = reply.read()
        except urllib.error.HTTPError as err:
            problem = f"HTTP {err.code}: {_excerpt(_error_body(err))}"
            if err.code != 429 and err.code < 500:
                raise JudgeError(f"judge {endpoint}: {problem}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # refused, reset, timed out
            problem = f"unreachable ({getattr(err, 'reason', err)}); is the judge server running?"
        else:
            try:
                return json.loads(body)
            except ValueError:
                raise JudgeError(f"judge {endpoint}: HTTP 200 but the reply is not JSON: {_excerpt(body)}") from None
    raise JudgeError(f"judge {endpoint}: {problem} (after {settings.max_retries + 1} attempts)")


def _error_body(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read()
    except (OSError, http.client.HTTPException, AttributeError):
        return b""


def _excerpt(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return repr(text[:EXCERPT_CHARS] + ("..." if len(text) > EXCERPT_CHARS else ""))
