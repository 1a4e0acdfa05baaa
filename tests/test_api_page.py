"""The page at ``/`` in a real headless chromium: the key typed once into its form, then the
key's batches with a progress bar (seen in a screenshot) and their counts (in the DOM)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fusillade_celery.mock_upstream import MockConfig, MockUpstream

from .api_server import Server, jsonl, make_key, server_env, serving
from .browser import Browser, count_colour
from .conftest import line
from .services import wait_for

GREEN = (0x2E, 0x9D, 0x46)  # .bar .done


@pytest.fixture
def browser() -> Iterator[Browser]:
    b = Browser()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with MockUpstream(MockConfig()) as mock:
        env = server_env(f"sqlite:///{tmp_path / 'page.sqlite3'}", mock.url, model_limits="pg=25")
        env["KEY"] = make_key(env, "viewer")
        env["OTHER"] = make_key(env, "someone-else")
        with serving(env, tmp_path / "serve.log") as s:
            yield s


def test_the_page_shows_a_running_batch_with_its_progress(
    server: Server, browser: Browser, tmp_path: Path
) -> None:
    """Given a batch of 20 requests, 8 answered at once and 12 held by the upstream, when
    its owner types the key into the page, then the page shows it running with 8/20
    completed, a progress bar 40 % green, the model's limit and 12 in flight; another
    key's batch is not on it."""
    sdk = server.sdk(server.env["KEY"])
    lines = [line(f"fast{i}", model="pg") for i in range(8)]
    lines += [line(f"held{i}", model="pg", mock_latency_ms=60_000) for i in range(12)]
    f = sdk.files.create(file=("page.jsonl", jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h"
    )
    other = server.sdk(server.env["OTHER"])
    hidden = other.batches.create(
        input_file_id=other.files.create(file=("o.jsonl", jsonl([line("o1")])), purpose="batch").id,
        endpoint="/v1/chat/completions",
        completion_window="1h",
    )
    wait_for(
        lambda: (c := sdk.batches.retrieve(batch.id).request_counts) and c.completed == 8,
        20,
        what="8 of 20 completed",
    )
    browser.goto(server.url + "/")
    assert browser.eval("document.querySelector('#key') !== null")
    assert server.env["KEY"] not in browser.eval("location.href")
    browser.type_into("#key", server.env["KEY"])
    browser.eval("document.getElementById('enter').click()")
    row = f"document.getElementById('{batch.id}')"
    wait_for(lambda: browser.eval(f"{row} !== null"), 20, what="the batch on the page")
    assert server.env["KEY"] not in browser.eval("location.href")
    assert browser.eval("document.cookie") == ""  # HttpOnly: no script can read the key
    wait_for(
        lambda: browser.eval(f"{row}.querySelector('.completed').textContent") == "8",
        20,
        what="the page's counts",
    )
    assert browser.eval(f"{row}.dataset.status") == "in_progress"
    assert browser.eval(f"{row}.querySelector('.total').textContent") == "20"
    assert browser.eval(f"{row}.querySelector('.failed-count').textContent") == "0"
    assert browser.eval(f"{row}.querySelector('.bar').getAttribute('aria-valuenow')") == "40"
    links = browser.eval(f"[...{row}.querySelectorAll('a')].map(a => a.textContent)")
    assert links == ["output", "errors"]
    model = "[...document.querySelectorAll('#models tr.model')].map(r => r.innerText)"
    assert browser.eval(model) == ["pg\t25\t12"]
    assert browser.eval(f"document.getElementById('{hidden.id}')") is None
    browser.screenshot(tmp_path / "page.png")
    bar = browser.screenshot(tmp_path / "bar.png", f"[id='{batch.id}'] .bar")
    width = 220
    green = count_colour(bar, GREEN)
    assert 0.3 * width * 14 < green < 0.5 * width * 14, green  # 40 % of the 220 x 14 bar
    sdk.batches.cancel(batch.id)
