"""vlm-ui in a real headless browser: two photos dropped in, a question sent, the streamed reply read.

Starts the real `vlm-serve` on the tiny export and `vlm-ui --server` pointing at it, each as its
own process, and drives Debian's Chromium through /usr/bin/chromedriver with Selenium (no Selenium
Manager: it downloads drivers, which cannot work offline). Four turns: two photos and a question,
a follow-up without images (turn 1's photos still in the request), a file that is no image (the
server's refusal shown in the chat), and one more question (the refused turn left out). Each
reply the page holds must equal what the server answers the openai client for the same
conversation at temperature 0. Screenshots go to $VLM_TEST_ARTIFACTS (default: the test's
tmp_path) and their paths are printed. A second test runs `vlm-ui --model`'s in-process server
without a browser and checks the reply streams in growing pieces.

Without chromium / chromedriver / selenium the browser test is skipped, naming what is missing --
except under CI=true, where a missing browser is a failure.

    python -m pytest tests/test_ui.py -q -s
"""
from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUESTION = "What do these two pictures show?"
FOLLOW_UP = "Which of the two is brighter?"
AFTER_ERROR = "Thank you. And the first one?"
MAX_TOKENS = 24
START_TIMEOUT = 120      # seconds for a server process to answer
REPLY_TIMEOUT = 60       # seconds for the reply to appear and stop streaming


def require_browser():
    """Skip (fail under CI=true) unless Chromium, chromedriver and Selenium are all here."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install selenium)")
    if missing:
        reason = (f"the real-browser UI test needs {', '.join(missing)} "
                  "(Debian: apt-get install chromium chromium-driver)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)


def start(cmd: list[str], url: str, log: Path) -> subprocess.Popen:
    """Run cmd (output to log) and wait until url answers 200; fail with the log if it never does.

    Gradio keeps uploads under GRADIO_TEMP_DIR: the test's own folder, not /tmp/gradio."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               GRADIO_TEMP_DIR=str(log.parent / "gradio"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    out.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{' '.join(cmd)} did not answer {url} in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def served(tiny_export, tmp_path):
    """(vlm-serve's /v1 URL, the vlm-ui page's URL), both running for the test."""
    from vlm_dist.serve.ui import free_port

    port = free_port()
    serve = start([sys.executable, "-m", "vlm_dist.serve.cli", "--model", str(tiny_export),
                   "--host", "127.0.0.1", "--port", str(port)],
                  f"http://127.0.0.1:{port}/health", tmp_path / "vlm-serve.log")
    procs = [serve]
    try:
        api = f"http://127.0.0.1:{port}/v1"
        ui_port = free_port()
        procs.append(start([sys.executable, "-m", "vlm_dist.serve.ui", "--server", api,
                            "--host", "127.0.0.1", "--port", str(ui_port),
                            "--temperature", "0", "--max-tokens", str(MAX_TOKENS)],
                           f"http://127.0.0.1:{ui_port}/", tmp_path / "vlm-ui.log"))
        yield api, f"http://127.0.0.1:{ui_port}/"
    finally:
        for p in reversed(procs):
            stop(p)


@pytest.fixture
def browser():
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server",
                "--window-size=1280,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def server_reply(api: str, messages: list[dict]) -> str:
    """What the server answers the openai client for these messages at temperature 0, not streamed."""
    import openai

    client = openai.OpenAI(base_url=api, api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           max_tokens=MAX_TOKENS)
    return reply.choices[0].message.content


def jpeg_part(path: str) -> dict:
    """An OpenAI image_url content part carrying a JPEG file as a base64 data: URL."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}


def send(driver, files: list[str], text: str) -> str:
    """Attach files, type text, send; the assistant's reply once it has stopped streaming."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, REPLY_TIMEOUT, poll_frequency=0.2)
    replies_before = len(driver.find_elements(By.CSS_SELECTOR, "[data-testid=bot]"))
    if files:
        # The message box's file input: what a drop or the paperclip button feeds. Cleared
        # first, since chromedriver adds to the files a `multiple` input already holds.
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[data-testid=file-upload]"))
        driver.execute_script("arguments[0].value = '';", upload)
        upload.send_keys("\n".join(files))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.thumbnail-image")) == len(files))
    driver.find_element(By.CSS_SELECTOR, "textarea[data-testid=textbox]").send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "button.submit-button").click()

    # Streaming is over when the submit button is back (a stop button stands in for it
    # meanwhile) and the new reply has stopped changing between two polls.
    last = {"text": None}

    def finished(d):
        replies = d.find_elements(By.CSS_SELECTOR, "[data-testid=bot]")
        if len(replies) <= replies_before or not d.find_elements(By.CSS_SELECTOR, "button.submit-button"):
            return False
        text = replies[-1].text
        done = bool(text) and text == last["text"]
        last["text"] = text
        return text if done else False

    return wait.until(finished, f"no finished reply to {text!r} within {REPLY_TIMEOUT} s")


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save the page as $VLM_TEST_ARTIFACTS/name (default: under tmp_path) and print where."""
    folder = Path(os.environ.get("VLM_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(folder / name)), f"could not save {folder / name}"
    print(f"\nvlm-ui screenshot: {folder / name}")
    return folder / name


def copied_reply(driver) -> str:
    """The last reply exactly as the page holds it, through its own "Copy message" button.

    The shown text is rendered Markdown with HTML's blanks (`**a**  b` shows as "a b"), so the
    page's copy of the raw text is what is compared; the clipboard is swapped for a list.
    """
    from selenium.webdriver.common.by import By

    driver.execute_script("window.copied = []; navigator.clipboard.writeText = "
                          "(t) => { window.copied.push(t); return Promise.resolve(); };")
    driver.find_elements(By.CSS_SELECTOR, ".message-buttons-left button[aria-label='Copy message']")[-1].click()
    copied = driver.execute_script("return window.copied;")
    assert len(copied) == 1, f"the Copy button copied {copied!r}"
    return copied[0]


def test_browser_upload_two_photos_and_read_streamed_reply(browser, served, real_photos, tmp_path):
    # `browser` first: a missing Chromium skips before any server starts.
    from selenium.webdriver.common.by import By

    from vlm_dist.serve.ui import ERROR_MARK

    api, page = served
    photos = real_photos[:2]
    browser.get(page)

    # Turn 1: two photos and a question. The page shows both photos, in order, then the reply
    # streamed by the server; it equals the server's own answer to the same request.
    first = send(browser, photos, QUESTION)
    screenshot(browser, tmp_path, "vlm-ui-two-photos.png")
    first_raw = copied_reply(browser)
    user_imgs = browser.find_elements(By.CSS_SELECTOR, "[data-testid=user] img")
    assert [Path(i.get_attribute("src")).name for i in user_imgs] == [Path(p).name for p in photos]
    messages = [{"role": "user", "content": [jpeg_part(p) for p in photos]
                 + [{"type": "text", "text": QUESTION}]}]
    expected = server_reply(api, messages)
    assert expected.strip(), "the server's reply at temperature 0 is empty: nothing to compare"
    assert first.strip(), "the page shows an empty reply"
    assert first_raw == expected, (first_raw, expected)

    # Turn 2: a follow-up with no image; the request still carries turn 1's photos.
    send(browser, [], FOLLOW_UP)
    second = copied_reply(browser)
    messages += [{"role": "assistant", "content": expected},
                 {"role": "user", "content": [{"type": "text", "text": FOLLOW_UP}]}]
    expected_second = server_reply(api, messages)
    assert second == expected_second, (second, expected_second)

    # Turn 3: a file that is no image. The server's refusal is shown in the chat, not a traceback.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    third = send(browser, [str(broken)], "And this one?")
    assert third.startswith(ERROR_MARK.strip()) and "(400)" in third and "image" in third, third

    # Turn 4: the refused turn is left out of what follows; the conversation goes on.
    send(browser, [], AFTER_ERROR)
    screenshot(browser, tmp_path, "vlm-ui-conversation.png")
    fourth = copied_reply(browser)
    print(f"replies: {[first_raw, second, third, fourth]!r}")
    messages += [{"role": "assistant", "content": expected_second},
                 {"role": "user", "content": [{"type": "text", "text": AFTER_ERROR}]}]
    expected_fourth = server_reply(api, messages)
    assert fourth == expected_fourth, (fourth, expected_fourth)


def test_model_flag_serves_in_process_and_streams(tiny_export, real_photos):
    """`vlm-ui --model`: vlm-serve's app in this process, reached like any server; the reply streams
    in growing pieces that end in the server's own answer; the server stops with the UI."""
    from vlm_dist.serve.ui import Chat, LocalServer

    local = LocalServer(str(tiny_export))
    try:
        chat = Chat(local.url, api_key=None)
        photos = real_photos[:2]
        pieces = [m["content"][0]["text"] for m in
                  chat.respond({"text": QUESTION, "files": photos}, [], "", 0.0, MAX_TOKENS)]
        messages = [{"role": "user", "content": [jpeg_part(p) for p in photos]
                     + [{"type": "text", "text": QUESTION}]}]
        expected = server_reply(local.url, messages)
    finally:
        local.stop()
    assert not local.thread.is_alive()
    assert len(pieces) > 1, f"the reply came in one piece, not streamed: {pieces}"
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:])), pieces
    assert pieces[-1] == expected, (pieces[-1], expected)
