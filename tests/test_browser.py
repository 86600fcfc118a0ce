"""The demo page in a real browser: Debian's headless chromium driven by playwright uploads an image (or, on a
model that listens, a sound), asks a question, reads the answer as it streams and saves a screenshot (under the
test's tmp dir)."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from pipeline.config import EngineConfig
from serve.app import create_app
from serve.demo import DEMO_PATH, mount_demo
from serve.protocol import ServerConfig
from gemma4_fixtures import gemma4_folder  # noqa: F401 (fixture)
from server_fixtures import running_server, wav_bytes

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
QUESTION = "What shape is this?"
pytestmark = [
    pytest.mark.slow,
    # gradio 6.31's gr.Image(type="filepath") opens the upload with PIL to read its mode and never closes it
    pytest.mark.filterwarnings(r"ignore:unclosed file <_io.BufferedReader name='[^']*gradio[/\\]:ResourceWarning"),
]


def _shape_png(path: Path) -> Path:
    image = Image.new("RGB", (96, 72), (235, 235, 225))
    ImageDraw.Draw(image).ellipse((30, 18, 66, 54), fill=(215, 35, 35))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"Debian's chromium is missing at {CHROMIUM}: run `make browser` as root "
                    "(apt-get install -y chromium); playwright's own browser download is not used")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                                             timeout=60_000)
        yield browser
        browser.close()


def test_upload_ask_stream_and_screenshot(browser, tiny_checkpoint, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    image = _shape_png(media / "red_circle.png")
    app = create_app(EngineConfig(model=str(tiny_checkpoint), num_blocks=300, block_size=8), ServerConfig())
    mount_demo(app, media_dir=media)
    with running_server(app) as url:
        # the page's defaults: 32 tokens, greedy (typing into its slider from a test raced the click on Ask)
        api = httpx.post(url + "/v1/generate", data={"prompt": QUESTION, "max_tokens": "32", "temperature": "0"},
                         files={"image": ("c.png", image.read_bytes(), "image/png")}, timeout=60).json()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(url + DEMO_PATH)
        page.locator("#image input[type=file]").set_input_files(str(image))
        page.locator("#image img").first.wait_for()  # the upload is shown
        page.locator("#question textarea").fill(QUESTION)
        page.evaluate("""() => {  // every state the stats line goes through, as it streams
            window.seenStats = [];
            const stats = document.querySelector('#stats');
            new MutationObserver(() => window.seenStats.push(stats.innerText))
                .observe(stats, {subtree: true, childList: true, characterData: true});
        }""")
        page.locator("#ask").click()
        page.locator("#stats", has_text="finished:").wait_for()
        # the final answer and the final stats line can render in different frames: give the answer a moment
        try:
            page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want",
                                   arg=["#answer textarea", api["text"]], timeout=10_000)
        except Exception:  # noqa: BLE001 - the assertion below reports what the page shows
            pass
        answer = page.locator("#answer textarea").input_value()
        stats = page.locator("#stats").inner_text()
        seen = page.evaluate("window.seenStats")
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        page.close()
    print(f"screenshot: {tmp_path / 'demo.png'}")
    assert answer == api["text"]
    assert f"prompt: {api['usage']['prompt_tokens']} tokens" in stats and "tokens/s" in stats
    assert f"{api['usage']['completion_tokens']} tokens in" in stats
    assert any("generating" in s for s in seen), seen  # partial answers were shown before the end
    assert re.search(r"\d+(\.\d+)? tokens/s", stats)


def test_audio_upload_and_question_on_a_model_that_listens(browser, gemma4_folder, tmp_path):
    """On a Gemma 4 Unified checkpoint the page shows the audio input once it learns the model takes audio; an
    uploaded sound and its question give the chat API's answer to the same message."""
    sound = tmp_path / "beeps.wav"
    sound.write_bytes(wav_bytes()[0])
    question = "How many beeps are there?"
    app = create_app(EngineConfig(model=str(gemma4_folder), num_blocks=256, block_size=8), ServerConfig())
    mount_demo(app, media_dir=tmp_path / "no-media")
    with running_server(app) as url:
        part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(sound.read_bytes()).decode(),
                                                       "format": "wav"}}
        api = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": question}]}],
            "max_tokens": 32, "temperature": 0}).json()
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url + DEMO_PATH)
        page.locator("#audio input[type=file]").set_input_files(str(sound))  # shown on load: the model listens
        page.locator("#audio audio, #audio .waveform-container, #audio [data-testid='waveform-audio']").first.wait_for(
            state="attached")
        page.locator("#question textarea").fill(question)
        page.locator("#ask").click()
        page.locator("#stats", has_text="finished:").wait_for()
        try:
            page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want",
                                   arg=["#answer textarea", api["choices"][0]["message"]["content"]], timeout=10_000)
        except Exception:  # noqa: BLE001 - the assertion below reports what the page shows
            pass
        answer = page.locator("#answer textarea").input_value()
        stats = page.locator("#stats").inner_text()
        page.screenshot(path=str(tmp_path / "demo-audio.png"), full_page=True)
        page.close()
    assert answer == api["choices"][0]["message"]["content"]
    assert f"prompt: {api['usage']['prompt_tokens']} tokens" in stats
