"""A person in a real browser (headless Chromium): chats on the web page, opens the other
candidates, gives thumbs, a rating and a preference; the rows land in the feedback log."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.feedback_store import open_store

from .conftest import E2E_KEY

CHROMIUM = Path("/usr/bin/chromium")


def _chromium_or_skip() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() == 0:
        import subprocess

        subprocess.run(
            ["apt-get", "install", "-y", "chromium"], check=False, capture_output=True, timeout=600
        )
        if CHROMIUM.exists():
            return CHROMIUM
        pytest.skip("could not install chromium with apt-get (no package registry?)")
    pytest.skip("headless Chromium needs /usr/bin/chromium: run `apt-get install -y chromium` as root")


@contextlib.contextmanager
def _page() -> Iterator[Any]:
    """A new page in headless Chromium (skips the test where there is none)."""
    chromium = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(chromium),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def _open_settings_with_key(page) -> None:
    """Open the page's settings and enter the test gateway's API key, as a person would."""
    page.click("#settings summary")
    page.fill("#api-key", E2E_KEY)
    page.dispatch_event("#api-key", "change")


def _wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _ask(page, text: str, best_of: int, max_tokens: int) -> None:
    """Set the candidates and the answer length in the settings, type ``text`` and send it."""
    page.fill("#best-of", str(best_of))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.click("#send")


@pytest.mark.browser
def test_chat_and_feedback_from_the_web_page(stack):
    from playwright.sync_api import expect

    with _page() as page:
        page.goto(stack.url + "/")
        _open_settings_with_key(page)
        _ask(page, "What a lovely morning!", best_of=3, max_tokens=10)
        answer = page.locator("article.assistant").first
        expect(answer).to_be_visible(timeout=30_000)
        cid = answer.get_attribute("data-completion-id")
        assert cid and cid.startswith("chatcmpl-")
        expect(answer.locator(".meta")).to_contain_text("best of 3")

        answer.locator(".thumb.up").click()
        expect(answer.locator(".ack")).to_have_text("thanks!")
        answer.locator('.stars button[data-rating="4"]').click()
        expect(answer.locator('.stars button[data-rating="4"]')).to_have_class("chosen")

        answer.locator(".show-candidates").click()
        items = answer.locator(".candidate-list li")
        expect(items).to_have_count(3)
        answer.locator(".cmp-a").select_option("2")
        answer.locator(".cmp-b").select_option("0")
        answer.locator(".prefer-a").click()  # candidate 2 beats candidate 0

        def rows():
            with open_store(f"sqlite:///{stack.db_path}") as store:
                return store.list_feedback(cid)

        fb = _wait_for(lambda: (r := rows()) and len(r) == 3 and r)
        assert fb, f"expected three feedback rows for {cid}, got {rows()}"
        assert [(f.kind, f.choice_index, f.value) for f in fb[:2]] == [("thumbs", 0, 1), ("rating", 0, 4)]
        assert (fb[2].kind, fb[2].preferred_index, fb[2].rejected_index) == ("preference", 2, 0)
        with open_store(f"sqlite:///{stack.db_path}") as store:
            rec = store.get_completion(cid)
        shown = answer.locator(".text").text_content()
        assert shown == (rec.candidates[0].text or "(empty answer)")
        texts = [items.nth(i).locator(".candidate-text").text_content() for i in range(3)]
        assert texts == [c.text or "(empty)" for c in rec.candidates]
        assert rec.messages == [{"role": "user", "content": "What a lovely morning!"}]
        # an answer cut by its token limit carries a visible marker, any other does not
        if rec.candidates[0].finish_reason == "length":
            expect(answer.locator(".cut")).to_be_visible()
            expect(answer.locator(".cut")).to_contain_text("cut: length")
        else:
            expect(answer.locator(".cut")).to_be_hidden()


@pytest.mark.browser
def test_one_answer_streams_and_the_page_needs_no_emoji_font(stack):
    import urllib.request

    from playwright.sync_api import expect

    with urllib.request.urlopen(stack.url + "/favicon.ico", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("image/svg+xml")
        assert resp.read().lstrip().startswith(b"<svg")

    with _page() as page:
        problems: list[str] = []  # CSP violations and script errors show up here
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        requests: list[dict] = []
        page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and requests.append(r.post_data_json))
        page.goto(stack.url + "/")
        expect(page.locator("#reward-hint")).to_contain_text("Reward")
        _open_settings_with_key(page)
        _ask(page, "How is your garden?", best_of=1, max_tokens=12)
        answer = page.locator("article.assistant").first
        expect(answer.locator(".meta")).to_contain_text("best of 1", timeout=30_000)
        assert requests and requests[0]["stream"] is True and requests[0]["best_of"] == 1
        cid = answer.get_attribute("data-completion-id")
        assert cid and cid.startswith("chatcmpl-")
        with open_store(f"sqlite:///{stack.db_path}") as store:
            rec = store.get_completion(cid)  # stored before the stream ends
        assert answer.locator(".text").text_content() == (rec.candidates[0].text or "(empty answer)")
        answer.locator(".thumb.down").click()
        expect(answer.locator(".ack")).to_have_text("thanks!")
        # icons are inline SVG, not emoji characters a font may lack
        html = page.content()
        assert not any(0x1F300 <= ord(ch) <= 0x1FAFF for ch in html)
        expect(answer.locator(".thumb.up svg")).to_have_count(1)
        assert page.evaluate("document.querySelector('link[rel=icon]').href").endswith("/favicon.ico")
        assert not problems, problems


CONTEXT = 256  # the stack's tiny model: max_seq_len, in byte tokens plus BOS
ANSWER_TOKENS = 8  # the page's max tokens in the long conversation


def _expected_dropped(messages: list[dict]) -> int:
    """Messages the gateway must leave out of ``messages`` (user/assistant turns, the last one
    the user's) so that the prompt plus the answer fit the context: whole exchanges, oldest
    first, no more than needed."""
    from palm_rlhf.chat import format_chat

    def tokens(kept: list[dict]) -> int:
        return 1 + len(format_chat(kept).encode("utf-8"))  # BOS + one token per byte

    dropped = 0
    while tokens(messages[dropped:]) > CONTEXT - ANSWER_TOKENS:
        dropped += 2  # one user message and its answer
        assert dropped < len(messages), "even the latest message alone does not fit"
    return dropped


@pytest.mark.browser
def test_a_twelve_turn_conversation_keeps_its_history_and_says_when_old_turns_are_left_out(stack):
    from playwright.sync_api import expect

    with _page() as page:
        problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        requests: list[dict] = []
        page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/chat/completions")
                and requests.append(r.post_data_json))  # fmt: skip
        page.goto(stack.url + "/")
        _open_settings_with_key(page)
        page.fill("#max-tokens", str(ANSWER_TOKENS))

        typed: list[str] = []
        shown: list[str] = []
        dropped_seen: list[int] = []
        answers = page.locator("article.assistant")
        for k in range(1, 13):
            best_of = 1 if k % 2 else 2  # streamed and ranked turns, one after the other
            page.fill("#best-of", str(best_of))
            text = f"Message {k} of twelve: what do you think about the weather in the garden today?"
            typed.append(text)
            page.locator("#prompt").press_sequentially(text)
            page.click("#send")
            # the answer is rendered, the turn is in the page's history and Send is back (or an error)
            page.wait_for_function(
                """k => document.querySelector('article.turn.error') ||
                   (document.querySelectorAll('article.assistant:not(.streaming)').length === k &&
                    !document.querySelector('#send').disabled)""",
                arg=k,
                timeout=30_000,
            )
            errors = page.locator("article.turn.error")
            assert errors.count() == 0, f"turn {k}: {errors.first.text_content()}"
            expect(answers).to_have_count(k)
            answer = answers.nth(k - 1)
            text_shown = answer.locator(".text").text_content()
            shown.append("" if text_shown == "(empty answer)" else text_shown)
            meta = answer.locator(".meta").text_content()
            assert f"best of {best_of}" in meta, (k, meta)

            # the request of turn k carries the whole conversation: 2k-1 messages in order
            assert len(requests) == k, (k, len(requests))
            req = requests[k - 1]
            assert req["best_of"] == best_of and req.get("stream", False) is (best_of == 1), req
            assert req["max_tokens"] == ANSWER_TOKENS
            msgs = req["messages"]
            assert len(msgs) == 2 * k - 1, (k, msgs)
            assert [m["role"] for m in msgs] == ["user", "assistant"] * (k - 1) + ["user"]
            assert [m["content"] for m in msgs[0::2]] == typed
            assert [m["content"] for m in msgs[1::2]] == shown[:-1]

            # what the gateway kept: the newest exchanges that fit, said on the page
            dropped = _expected_dropped(msgs)
            dropped_seen.append(dropped)
            if dropped:
                assert f"· {dropped} oldest turns left out to fit the model" in meta, (k, dropped, meta)
            else:
                assert "left out" not in meta, (k, meta)
            cid = answer.get_attribute("data-completion-id")
            with open_store(f"sqlite:///{stack.db_path}") as store:
                rec = store.get_completion(cid)
            assert rec.best_of == best_of
            assert [(m["role"], m["content"]) for m in rec.messages] == [
                (m["role"], m["content"]) for m in msgs[dropped:]
            ]
        assert dropped_seen[0] == 0 and dropped_seen[-1] > 0, dropped_seen  # the history overflowed
        assert not problems, problems
