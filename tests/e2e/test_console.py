"""The console at `/` in a real browser (headless Debian Chromium driven by Playwright) against a
real `tokenrelay dev`: send, reload mid-run, drop and resume, stop and branch, one run per
double click, two tabs on one thread, a finished reply after a reload, threads, a restarted
server, an API key and a stream token.

Each test asserts what the page shows against what the server holds (the thread's state, the
run list). The demo is slowed down so a run is still live when a test drops, reloads or stops it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import HumanMessage
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.e2e.test_dev_command import running_dev
from tokenrelay.broker.embedded import free_port
from tokenrelay.producer.demo import reply_text

CHROMIUM = Path("/usr/bin/chromium")
REPLY_WORDS = 80
TOKEN_DELAY_MS = 60  # about 5 s a reply: long enough to act on a live run
DEMO = {
    "TOKENRELAY_DEMO_REPLY_WORDS": str(REPLY_WORDS),
    "TOKENRELAY_DEMO_TOKEN_DELAY_MS": str(TOKEN_DELAY_MS),
}
WAIT_MS = 60_000  # an upper bound for a state to be reached, never a timing under test

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            "the console tests drive Debian's Chromium at /usr/bin/chromium: "
            "apt-get install chromium (scripts/test installs it when run as root)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("console") / "dev.log"
    with running_dev(log, **DEMO) as (url, _proc):
        yield url


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage); a script error on the page fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert errors == []


# -- what the page shows ---------------------------------------------------------------------


def status(page: Page) -> str:
    return page.inner_text("#status")


def wait_status(page: Page, *labels: str) -> str:
    """Wait until the status label is one of `labels`; returns it."""
    page.wait_for_function(
        "labels => labels.includes(document.getElementById('status').textContent)",
        arg=list(labels),
        timeout=WAIT_MS,
    )
    return status(page)


def wait_tokens(page: Page, n: int) -> None:
    """Wait until the live reply shows at least `n` tokens."""
    page.wait_for_function(
        "n => document.querySelectorAll('.msg.live .tok').length >= n", arg=n, timeout=WAIT_MS
    )


def shown_reply(page: Page) -> str:
    return page.locator(".msg.ai .body").last.inner_text()


def token_ids(page: Page) -> list[str]:
    """The SSE ids of the tokens of the last reply shown."""
    ids: list[str] = page.evaluate(
        "[...[...document.querySelectorAll('.msg.ai')].at(-1).querySelectorAll('.tok')]"
        ".map(e => e.dataset.id)"
    )
    return ids


def session(page: Page) -> dict[str, Any]:
    raw = page.evaluate("sessionStorage.getItem('tokenrelay.console')")
    return dict(json.loads(raw)) if raw else {}


def current_thread(page: Page) -> str:
    thread_id = session(page)["threadId"]
    assert isinstance(thread_id, str)
    return thread_id


def send(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")


# -- what the server holds -------------------------------------------------------------------


def messages(url: str, thread_id: str, headers: dict[str, str] | None = None) -> list[Any]:
    state = httpx.get(f"{url}/threads/{thread_id}/state", headers=headers).json()
    return list(state["values"]["messages"])


def runs(url: str, thread_id: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/threads/{thread_id}/runs").json())


def full_reply(*conversation: str) -> str:
    return reply_text([HumanMessage(text) for text in conversation], REPLY_WORDS)


def assert_whole_reply_once(page: Page, url: str, prompt: str) -> None:
    """The page shows the thread's reply exactly: every token once, none missing."""
    thread_id = current_thread(page)
    assert [m["type"] for m in messages(url, thread_id)] == ["human", "ai"]
    assert messages(url, thread_id)[1]["content"] == full_reply(prompt)
    assert shown_reply(page) == full_reply(prompt)
    ids = token_ids(page)
    assert len(ids) == len(set(ids)) >= REPLY_WORDS
    assert page.locator(".msg").count() == 2
    assert page.locator(".card.fail").count() == 0


# -- the tests ---------------------------------------------------------------------------------


def test_send_streams_the_reply_with_its_event_ids(page: Page, dev: str) -> None:
    page.goto(dev)
    page.wait_for_selector("#send:enabled")  # a prompt is there: Send is on once the page is up
    page.fill("#prompt", "   ")
    assert page.is_disabled("#send")  # nothing empty is sent
    send(page, "hello console")
    wait_tokens(page, 3)
    assert status(page) == "streaming"
    assert page.is_disabled("#send")  # one run at a time
    page.check("#show-ids")
    assert page.evaluate("document.body.classList.contains('show-ids')")
    assert wait_status(page, "done", "error", "interrupted") == "done"
    assert_whole_reply_once(page, dev, "hello console")
    # The ids shown are the run's SSE ids, in the order the stream sent them.
    thread_id = current_thread(page)
    (run,) = runs(dev, thread_id)
    url = f"{dev}/threads/{thread_id}/runs/{run['run_id']}/events?after=0&limit=10000"
    polled = httpx.get(url).json()["events"]
    assert token_ids(page) == [e["id"] for e in polled if e["event"] == "messages"]
    assert page.is_disabled("#send")  # the prompt was cleared
    # The thread is in the sidebar, titled after its first message.
    # (renamed by a PATCH the page sends beside the run, so waited for)
    expect(page.locator(f'#thread-list li[data-thread="{thread_id}"] .title')).to_have_text(
        "hello console", timeout=30_000
    )


def test_reload_mid_run_shows_the_whole_reply_once(page: Page, dev: str) -> None:
    page.goto(dev)
    send(page, "reload me")
    wait_tokens(page, 10)
    before = session(page)["run"]["lastId"]
    page.reload()
    # The page resumes after the last id it showed, with what it had shown restored.
    assert wait_status(page, "resumed", "done") in ("resumed", "done")
    assert wait_status(page, "done", "error", "interrupted") == "done"
    assert before in token_ids(page)
    assert_whole_reply_once(page, dev, "reload me")


def test_drop_connection_resumes_with_no_gap(page: Page, dev: str) -> None:
    page.goto(dev)
    send(page, "drop me")
    wait_tokens(page, 5)
    page.click("#drop")
    assert status(page) == "reconnecting"
    card = page.locator(".card.resume")
    card.filter(has_text="no gap, no duplicate").wait_for(timeout=WAIT_MS)
    missed = int(re.search(r"(\d+) events", card.inner_text()).group(1))  # type: ignore[union-attr]
    assert missed > 0  # offline long enough for the run to go on without us
    assert wait_status(page, "resumed", "done") in ("resumed", "done")
    assert wait_status(page, "done", "error", "interrupted") == "done"
    assert_whole_reply_once(page, dev, "drop me")


def test_stop_keeps_the_partial_reply_and_branches_from_its_checkpoint(
    page: Page, dev: str
) -> None:
    page.goto(dev)
    send(page, "stop me")
    wait_tokens(page, 5)
    page.click("#stop")
    assert wait_status(page, "interrupted", "done", "error") == "interrupted"
    thread_id = current_thread(page)
    (run,) = runs(dev, thread_id)
    assert run["status"] == "interrupted"
    checkpoint = page.inner_text(".card.stop .checkpoint")
    assert checkpoint == run["checkpoint_id"]
    # The thread holds the partial reply the page shows: a strict prefix of the whole one.
    held = messages(dev, thread_id)
    assert [m["type"] for m in held] == ["human", "ai"]
    assert held[1]["additional_kwargs"] == {"cancelled": True}
    partial = shown_reply(page)
    assert partial == held[1]["content"]
    assert full_reply("stop me").startswith(partial) and len(partial) < len(full_reply("stop me"))
    assert page.is_visible("text=stopped, partial reply saved")

    # After a reload it is still there, with its checkpoint and the branch button.
    page.reload()
    assert wait_status(page, "interrupted") == "interrupted"
    assert shown_reply(page) == partial
    assert page.inner_text(".card.stop .checkpoint") == checkpoint

    page.fill("#prompt", "go on")
    page.click("#branch")
    assert wait_status(page, "done", "error", "interrupted") == "done"
    (branch,) = [r for r in runs(dev, thread_id) if r["run_id"] != run["run_id"]]
    assert branch["kwargs"]["checkpoint_id"] == checkpoint
    held = messages(dev, thread_id)
    assert [m["type"] for m in held] == ["human", "ai", "human", "ai"]
    assert held[1]["content"] == partial and held[2]["content"] == "go on"
    assert shown_reply(page) == held[3]["content"]


def test_double_click_on_send_starts_one_run(page: Page, dev: str) -> None:
    page.goto(dev)
    page.fill("#prompt", "only once")
    page.dblclick("#send")
    assert wait_status(page, "done", "error", "interrupted") == "done"
    assert len(runs(dev, current_thread(page))) == 1
    assert_whole_reply_once(page, dev, "only once")


def test_a_run_started_in_another_tab_is_followed_not_doubled(
    browser: Browser, page: Page, dev: str
) -> None:
    page.goto(dev)
    send(page, "two tabs")
    assert wait_status(page, "done", "error", "interrupted") == "done"
    thread_id = current_thread(page)
    other = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = other.new_page()
    tab.goto(dev)
    tab.click(f'#thread-list li[data-thread="{thread_id}"]')
    assert wait_status(tab, "done") == "done"
    # The first tab starts a run; the second, still showing the thread idle, sends too: the
    # server refuses a second run (409) and the second tab follows the first one's instead.
    send(page, "from the first tab")
    wait_tokens(page, 3)
    send(tab, "from the second tab")
    assert wait_status(tab, "done", "error", "interrupted") == "done"
    assert wait_status(page, "done", "error", "interrupted") == "done"
    assert len(runs(dev, thread_id)) == 2
    held = messages(dev, thread_id)
    assert [m["content"] for m in held if m["type"] == "human"] == [
        "two tabs",
        "from the first tab",
    ]
    assert shown_reply(tab) == shown_reply(page) == held[3]["content"]
    assert tab.locator(".msg").count() == 4
    other.close()


def test_reload_after_the_end_shows_the_finished_reply(page: Page, dev: str) -> None:
    page.goto(dev)
    send(page, "finished")
    assert wait_status(page, "done", "error", "interrupted") == "done"
    page.reload()
    assert wait_status(page, "done") == "done"
    assert page.locator(".msg").count() == 2
    assert shown_reply(page) == full_reply("finished")
    assert "run" not in session(page)


def test_threads_are_created_picked_and_renamed(page: Page, dev: str) -> None:
    page.goto(dev)
    send(page, "first thread")
    assert wait_status(page, "done", "error", "interrupted") == "done"
    first = current_thread(page)
    page.click("#new-thread")
    page.wait_for_function(
        "t => JSON.parse(sessionStorage.getItem('tokenrelay.console')).threadId !== t", arg=first
    )
    second = current_thread(page)
    assert page.locator(".msg").count() == 0
    item = page.locator(f'#thread-list li[data-thread="{second}"]')
    item.hover()
    item.locator(".rename").click()
    item.locator("input").fill("Renamed")
    item.locator("input").press("Enter")
    page.wait_for_function(
        "() => document.getElementById('thread-title').textContent === 'Renamed'"
    )
    assert httpx.get(f"{dev}/threads/{second}").json()["metadata"]["title"] == "Renamed"
    page.click(f'#thread-list li[data-thread="{first}"]')
    page.wait_for_function("() => document.querySelectorAll('.msg').length === 2", timeout=WAIT_MS)
    assert shown_reply(page) == full_reply("first thread")


def test_a_restarted_server_is_reported_not_resumed_forever(page: Page, tmp_path: Path) -> None:
    port = free_port()
    with running_dev(tmp_path / "dev1.log", port, **DEMO) as (url, _proc):
        page.goto(url)
        send(page, "restart me")
        wait_tokens(page, 5)
    # The server went away mid-run (its Redis and runs with it): the page retries...
    assert wait_status(page, "reconnecting", "error") == "reconnecting"
    with running_dev(tmp_path / "dev2.log", port, **DEMO):
        # ...and once a server answers again, it learns the run is unknown and says so.
        assert wait_status(page, "error") == "error"
        assert "unknown to the server" in page.inner_text(".card.fail")
        assert "run" not in session(page)
        page.fill("#prompt", "again")
        assert page.is_enabled("#send")  # no run is followed any more
        # A reload reports the thread as gone and clears it, rather than resuming.
        page.reload()
        assert wait_status(page, "error") == "error"
        assert "thread is unknown" in page.inner_text(".card.fail")
        assert "threadId" not in session(page)


def test_an_api_key_and_a_read_only_stream_token_link(
    browser: Browser, page: Page, tmp_path: Path
) -> None:
    key = "console-test-key"
    with running_dev(tmp_path / "dev.log", TOKENRELAY_API_KEYS=json.dumps([key]), **DEMO) as (
        url,
        _proc,
    ):
        page.goto(url)
        page.wait_for_selector("#banner.on", timeout=WAIT_MS)  # asked for a key
        assert "API key" in page.inner_text("#banner")
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
        send(page, "with a key")
        wait_tokens(page, 5)
        thread_id = current_thread(page)
        page.click("#share")
        link = page.locator(".card.resume code").last.inner_text()
        assert "stream_token=" in link and key not in link

        # Another browser, no key: the link streams the live run, read-only.
        other = browser.new_context()
        watcher = other.new_page()
        watcher.goto(link)
        assert wait_status(watcher, "done", "error") == "done"
        assert watcher.is_hidden("#composer")
        assert shown_reply(watcher) == full_reply("with a key")
        other.close()

        assert wait_status(page, "done", "error", "interrupted") == "done"
        held = messages(url, thread_id, {"x-api-key": key})
        assert shown_reply(page) == held[1]["content"] == full_reply("with a key")
