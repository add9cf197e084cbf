"""The page at / in headless Chromium (Debian's chromium + chromedriver, driven by selenium): type, send, see the
model's answer. Skips, saying why, where chromium is absent (`make test` installs it where it can)."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium is not installed: apt-get install chromium chromium-driver (make test tries it as root)",
)


class LiveServer:
    """uvicorn in a thread on a free loopback port, as `nlpkit serve` runs it."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def submit_and_read_answer(driver, url: str, text: str, screenshot: Path) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.ID, "meta").get_attribute("data-ready") == "1")
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    answer = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant.done, .error"))[0]
    driver.save_screenshot(str(screenshot))
    return answer


def test_page_chats_with_the_model(browser, tiny_llama, tmp_path):
    from fastapi.testclient import TestClient

    from nlpkit.serve import create_app, load_served

    app = create_app(load_served(str(tiny_llama)), max_tokens_limit=12)
    expected = TestClient(app).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "good food"}]}).json()["choices"][0]["message"]["content"]
    with LiveServer(app) as url:
        answer = submit_and_read_answer(browser, url, "good food", _shot(tmp_path, "chat"))
        assert "error" not in answer.get_attribute("class")
        assert answer.text.strip() == expected.strip() != ""  # the streamed answer, as the API gives it
        turns = browser.find_elements("css selector", ".turn.user")
        assert [t.text for t in turns] == ["good food"]


def test_page_classifies_text(browser, tiny_bert, tmp_path):
    from fastapi.testclient import TestClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from nlpkit.serve import create_app, load_served

    folder = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=2, id2label={0: "negative", 1: "positive"}).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    app = create_app(load_served(str(folder)))
    expected = TestClient(app).post("/v1/classify", json={"input": "a fine film"}).json()["data"][0]
    with LiveServer(app) as url:
        answer = submit_and_read_answer(browser, url, "a fine film", _shot(tmp_path, "classify"))
        assert answer.text.splitlines()[0] == f"label: {expected['label']}"
        assert f"{expected['score']:.3f}" in answer.text


def test_page_compares_texts_with_an_encoder(browser, tiny_bert, tmp_path):
    import torch
    from fastapi.testclient import TestClient

    from nlpkit.serve import create_app, load_served

    app = create_app(load_served(str(tiny_bert)))  # an encoder without a head: the page's similarity box
    texts = ["good food", "great food", "a cold rain"]
    vectors = torch.tensor([d["embedding"] for d in TestClient(app).post("/v1/embeddings", json={"input": texts})
                            .json()["data"]], dtype=torch.float64)  # as the page's JavaScript computes
    with LiveServer(app) as url:
        answer = submit_and_read_answer(browser, url, " | ".join(texts), _shot(tmp_path, "similarity"))
        assert "error" not in answer.get_attribute("class")
        assert answer.text.splitlines() == [f"{float(vectors[0] @ vectors[i]):.3f}  {texts[i]}" for i in (1, 2)]


def _shot(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("NLPKIT_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"serve-page-{name}.png"
