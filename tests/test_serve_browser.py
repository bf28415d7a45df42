"""The web UI in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): a message is
sent, the answer streams in, the tool call renders distinctly, edit/regenerate/new chat and the
sampling controls work, the API key prompt appears when the server asks for one. A screenshot of
the page lands in the test's tmp dir."""
from __future__ import annotations

import json
import os
import re
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from nanochat import chat_cli
from nanochat.serve import BackgroundServer, create_app
from nanochat.store import open_store
from tests.fixtures import make_tokenizer
from tests.test_serve import TOOL_ANSWER, ScriptedChat

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(open_store(f"file://{tmp_path_factory.mktemp('tok')}"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # Chromium writes its profile and crash dumps under HOME
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
            yield b
            b.close()
    finally:
        if old_home is not None:
            os.environ["HOME"] = old_home


@pytest.fixture(scope="module")
def served(tokenizer):
    model = ScriptedChat(tokenizer, delay=0.03)  # 30 ms per token: the answer visibly streams
    with BackgroundServer(create_app(model=model, tokenizer=tokenizer)) as server:
        yield server, model


def watch_streaming(page):
    """Record the length of the newest assistant message at every DOM change."""
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const all = document.querySelectorAll('.message.assistant .content');
            if (all.length) window.seen.push(all[all.length - 1].textContent.length);
        }).observe(document.getElementById('chat'), {childList: true, subtree: true, characterData: true});
    }""")


def test_chat_streams_tool_calls_and_history(browser, served, tokenizer, tmp_path):
    server, model = served
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_contain_text("custom")  # the checkpoint badge from /v1/models

    # send a message: the answer streams in, the tool call and its output render as their own blocks
    watch_streaming(page)
    page.fill("#input", "What is 12*7?")
    page.press("#input", "Enter")
    answer = page.locator(".message.assistant").last
    expect(answer).not_to_have_class(re.compile("streaming"), timeout=20_000)
    expect(answer.locator(".content")).to_have_text("Let me compute. 12*784 The answer is 84.")
    expect(answer.locator(".tool-call")).to_have_text("12*7")
    expect(answer.locator(".tool-output")).to_have_text("84")
    seen = page.evaluate("window.seen")
    growing = sorted(set(n for n in seen if n > 0))
    assert len(growing) >= 5, seen  # the text grew piece by piece, not all at once
    assert bodies[-1]["stream"] is True and bodies[-1]["messages"] == [{"role": "user", "content": "What is 12*7?"}]
    cli_defaults = chat_cli.build_parser().parse_args([])  # the web page samples like `nanochat chat`
    assert (bodies[-1]["temperature"], bodies[-1]["top_k"]) == (cli_defaults.temperature, cli_defaults.top_k)
    shot = tmp_path / "serve_ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    print(f"\nscreenshot: {shot}")

    # a follow-up sends the history back, tool call included, and the server parses it into parts
    page.fill("#input", "And now?")
    page.click("#send")
    expect(page.locator(".message.assistant")).to_have_count(2)
    expect(page.locator(".message.assistant").last).to_contain_text("The answer is 84.", timeout=20_000)
    assert bodies[-1]["messages"][1] == {"role": "assistant", "content": TOOL_ANSWER}
    parts = [{"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "12*7"},
             {"type": "python_output", "text": "84"}, {"type": "text", "text": " The answer is 84."}]
    assert model.prompts[-1] == tokenizer.render_for_completion({"messages": [
        {"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": parts}, {"role": "user", "content": "And now?"}]})
    expect(page.locator("#send")).to_be_visible()

    # regenerate: the last answer is replaced, not appended
    n_requests = len(bodies)
    page.locator(".message.assistant").last.locator("button", has_text="Regenerate").click()
    expect(page.locator("#send")).to_be_visible(timeout=20_000)
    assert len(bodies) == n_requests + 1 and len(bodies[-1]["messages"]) == 3
    expect(page.locator(".message.assistant")).to_have_count(2)

    # edit the first message: everything after it is dropped and the edited question is asked
    page.locator(".message.user").first.click()
    page.locator(".message.user textarea").fill("What is 6*7?")
    page.locator(".message.user button", has_text="Send").click()
    expect(page.locator("#send")).to_be_visible(timeout=20_000)
    assert bodies[-1]["messages"] == [{"role": "user", "content": "What is 6*7?"}]
    expect(page.locator(".message")).to_have_count(2)

    # the sampling controls go into the request
    page.evaluate("""() => {
        for (const [id, v] of [['temperature', '0.3'], ['top-k', '7']]) {
            const el = document.getElementById(id); el.value = v; el.dispatchEvent(new Event('input'));
        }
    }""")
    expect(page.locator("#temperature-value")).to_have_text("0.3")
    page.fill("#input", "again")
    page.press("#input", "Enter")
    expect(page.locator("#send")).to_be_visible(timeout=20_000)
    assert bodies[-1]["temperature"] == 0.3 and bodies[-1]["top_k"] == 7

    # new chat starts over
    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    page.close()


def test_stop_button_keeps_the_partial_answer_and_frees_the_server(browser, tokenizer):
    model = ScriptedChat(tokenizer, delay=0.03, ticking=True)
    with BackgroundServer(create_app(model=model, tokenizer=tokenizer)) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#input", "tick forever")
        page.press("#input", "Enter")
        answer = page.locator(".message.assistant").last
        expect(answer).to_contain_text("tick tick", timeout=20_000)
        page.click("#stop")
        expect(page.locator("#send")).to_be_visible()
        expect(answer).to_contain_text("tick")  # what came so far stays
        state = server.app.state.serve
        deadline = time.monotonic() + 15
        while state.in_flight or state.free.qsize() != 1:
            assert time.monotonic() < deadline, "the aborted request still holds the replica"
            time.sleep(0.05)
        page.close()


def test_api_key_prompt(browser, tokenizer):
    model = ScriptedChat(tokenizer)
    with BackgroundServer(create_app(model=model, tokenizer=tokenizer, api_key="sk-ui")) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        expect(page.locator("#auth")).to_be_visible()  # /v1/models said 401
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        expect(page.locator(".message.error")).to_contain_text("API key")
        page.fill("#api-key", "sk-ui")
        page.click("#save-key")
        expect(page.locator("#model")).to_contain_text("custom")
        page.locator(".message.error button", has_text="Retry").click()
        expect(page.locator(".message.assistant").last).to_contain_text("The answer is 84.", timeout=20_000)
        expect(page.locator(".message.error")).to_have_count(0)
        page.close()
