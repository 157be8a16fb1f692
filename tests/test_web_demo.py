"""`finevit-vl web-demo`: the Gradio app answers with the model's greedy answers through its API (`gradio_client`) and in
a real headless Chromium (upload, ask, see the answer), keeps the conversation, and draws boxes of grounding answers
on the image."""

import shutil
import socket
import subprocess
import sys

import pytest
from conftest import random_image
from PIL import Image

from finevit_vl import web_demo
from finevit_vl.chat import load_model


pytest.importorskip("gradio", reason='the web demo needs the demo extra: pip install -e ".[demo]"')
from gradio_client import Client, handle_file
from test_chat import MAX_NEW_TOKENS, assistant, greedy_answer, user


BOX_ANSWER = "the red circle is at [100, 200, 500, 600]"
# Gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def model_and_processor(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("web_images") / "scene.png"
    random_image(120, 160, 4).save(path)
    return str(path)


@pytest.fixture(scope="module")
def server(model_and_processor):
    """The demo served on a free local port from this process (Gradio's server runs in a background thread)."""
    demo = web_demo.build_demo(*model_and_processor, default_max_new_tokens=MAX_NEW_TOKENS)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def last_answer(chat_messages: list[dict]) -> str:
    message = chat_messages[-1]
    assert message["role"] == "assistant"
    content = message["content"]
    return content if isinstance(content, str) else "".join(item["text"] for item in content)


def fixed_reply(text: str):
    """A stand-in for `chat.reply` that answers `text` (a grounding answer a random tiny model would not give)."""
    def reply(model, processor, conversation, question, streamer=None, **generation):
        conversation.ask(question)
        conversation.answer(text)
        streamer.on_finalized_text(text, stream_end=True)
        return text
    return reply


def test_api_answers_greedily_and_keeps_the_conversation(server, model_and_processor, image_path):
    model, processor = model_and_processor
    image = Image.open(image_path).convert("RGB")
    a1 = greedy_answer(model, processor, [user("How many circles?", True)], [image])
    a2 = greedy_answer(model, processor, [user("How many circles?", True), assistant(a1), user("And squares?")], [image])
    client = Client(server, verbose=False)
    chat_messages, boxes, question = client.predict("How many circles?", handle_file(image_path), MAX_NEW_TOKENS, 0.0,
                                                    api_name="/chat")
    assert last_answer(chat_messages) == a1 and boxes is None and question == ""
    # Same image again: not attached a second time, the history goes with the question.
    chat_messages, _, _ = client.predict("And squares?", handle_file(image_path), MAX_NEW_TOKENS, 0.0, api_name="/chat")
    assert last_answer(chat_messages) == a2 and len(chat_messages) == 4
    assert client.predict(api_name="/clear")[0] == []


def test_grounding_answer_gets_its_box_drawn(server, image_path, monkeypatch):
    monkeypatch.setattr(web_demo, "reply", fixed_reply(BOX_ANSWER))
    _, boxes_path, _ = Client(server, verbose=False).predict("Where is the red circle?", handle_file(image_path),
                                                             MAX_NEW_TOKENS, 0.0, api_name="/chat")
    drawn = Image.open(boxes_path).convert("RGB")
    assert drawn.size == (160, 120)
    # [100, 200, 500, 600] in 0-1000 of a 160x120 image: x 16..80, y 24..72. Its edges are red, its inside is not.
    assert drawn.getpixel((48, 24)) == web_demo.BOX_COLOR and drawn.getpixel((16, 48)) == web_demo.BOX_COLOR
    assert drawn.getpixel((48, 48)) == Image.open(image_path).convert("RGB").getpixel((48, 48))


def test_answer_boxes_in_both_conventions():
    assert web_demo.answer_boxes("a [0, 0, 500, 1000] and [250, 250, 750, 750]", 200, 100) == [
        [0.0, 0.0, 100.0, 100.0], [50.0, 25.0, 150.0, 75.0]]
    assert web_demo.answer_boxes("[0.5, 0.5, 1.0, 1.0]", 200, 100, box_format="norm1") == [[100.0, 50.0, 200.0, 100.0]]
    assert web_demo.answer_boxes("no box here", 200, 100) == []


def test_bad_model_dir_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "finevit_vl.cli", "web-demo", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"finevit-vl web-demo: error: model directory not found: {tmp_path / 'nope'}"


# --------------------------------------------------------------------------------------------- real browser

@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason='needs selenium: pip install -e ".[dev]"')
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs chromium and chromedriver on PATH (`make setup` installs them on Debian/Ubuntu)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    yield browser
    browser.quit()


def ask_in_browser(browser, server: str, image_path: str, question: str) -> str:
    """Open the demo, upload the image, type the question, click Send; the answer once generation has finished."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(image_path)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image img"))  # uploaded and shown
    textbox = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    textbox.send_keys(question)
    browser.find_element(By.ID, "send").click()
    # The final update (after the last streamed token) clears the question box.
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
               and textbox.get_attribute("value") == "")
    return browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')[-1].text


def test_browser_upload_ask_and_see_the_answer(server, browser, model_and_processor, image_path):
    model, processor = model_and_processor
    expected = greedy_answer(model, processor, [user("How many circles?", True)], [Image.open(image_path).convert("RGB")])
    assert expected.strip()
    shown = ask_in_browser(browser, server, image_path, "How many circles?")
    assert shown.split() == expected.split()  # the page renders the text; whitespace runs are not significant in HTML


def test_browser_shows_the_drawn_box(server, browser, image_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setattr(web_demo, "reply", fixed_reply(BOX_ANSWER))
    assert ask_in_browser(browser, server, image_path, "Where is the red circle?") == BOX_ANSWER
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#boxes img"))
