"""A person in a real browser (headless Chromium): chats on the web page, opens the other
candidates, gives thumbs, a rating and a preference; the rows land in the feedback log."""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def _wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.mark.browser
def test_chat_and_feedback_from_the_web_page(stack):
    chromium = _chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(chromium),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.goto(stack.url + "/")
            page.click("#settings summary")
            page.fill("#api-key", E2E_KEY)
            page.dispatch_event("#api-key", "change")
            page.fill("#best-of", "3")
            page.fill("#max-tokens", "10")
            page.fill("#prompt", "What a lovely morning!")
            page.click("#send")
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
        finally:
            browser.close()


@pytest.mark.browser
def test_one_answer_streams_and_the_page_needs_no_emoji_font(stack):
    chromium = _chromium_or_skip()
    import urllib.request

    from playwright.sync_api import expect, sync_playwright

    with urllib.request.urlopen(stack.url + "/favicon.ico", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("image/svg+xml")
        assert resp.read().lstrip().startswith(b"<svg")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(chromium),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            problems: list[str] = []  # CSP violations and script errors show up here
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            requests: list[dict] = []
            page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and requests.append(r.post_data_json))
            page.goto(stack.url + "/")
            expect(page.locator("#reward-hint")).to_contain_text("Reward")
            page.click("#settings summary")
            page.fill("#api-key", E2E_KEY)
            page.dispatch_event("#api-key", "change")
            page.fill("#best-of", "1")
            page.fill("#max-tokens", "12")
            page.fill("#prompt", "How is your garden?")
            page.click("#send")
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
        finally:
            browser.close()
