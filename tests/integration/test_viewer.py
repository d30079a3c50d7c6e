"""The viewer pages on a running sidecar (real model, random 64-latent SAE, the tiny example library,
a feature index built in the test): pages over HTTP, then end to end in headless Chromium.

The browser tests drive Debian's ``chromium`` through ``chromedriver`` (Selenium) and save a
screenshot of each page (to ``docs/viewer/`` with ``AUDITOR_VIEWER_SCREENSHOTS=docs/viewer``, else a
temporary folder).
Install the browser with ``scripts/install_test_deps.sh``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import torch

from auditor.server.app import create_app
from auditor.server.background import BackgroundServer
from auditor.server.settings import Settings
from auditor.text import AuditInput, tokenize_batch
from auditor.sae import load_sae
from auditor.viewer.index import SAE_FINGERPRINT, FeatureIndex, IndexConfig, build_index, read_corpus, sae_fingerprint
from tests.conftest import make_random_sae

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"
FRAUD = "Congratulations! You won a prize. Send the processing fee by wire transfer today to claim it."
RULE = "fraud-peak"
CORPUS = [
    FRAUD,
    "Your bank account is locked; confirm your password at this link to unlock it.",
    "The weather in Lisbon was warm and sunny all week.",
    "She baked bread every Sunday morning before the market opened.",
    "Wire the deposit now and the lottery winnings are yours.",
    "The committee approved the new budget after a long debate.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "Claim your free gift card by sending a small handling fee.",
    "The train to Bristol leaves from platform four at noon.",
    "He repaired the old bicycle with parts from a flea market.",
    "Urgent: verify your identity or your account will be closed.",
    "The orchestra rehearsed the second movement twice.",
]


def _policy_yaml(feature: str, threshold: float) -> str:
    return f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: viewer-test}}
library: {TINY}
rules:
  - id: {RULE}
    description: The strongest tokens of the feature
    severity: high
    category: deception
    condition: {{feature: {feature}, agg: max, threshold: {threshold!r}}}
    actions: [alert]
"""


@dataclass
class Site:
    url: str
    app: Any
    index: FeatureIndex
    feature: str
    """The library feature the test policy's rule reads."""
    latent: int
    threshold: float
    index_path: Path


def _pick_rule(rt: Any) -> tuple[str, int, float]:
    """A library feature with at least three distinct positive activations on FRAUD, and a threshold
    between its second and third strongest tokens: the rule then fires on exactly two tokens."""
    batch = tokenize_batch(rt.auditor.model.tokenizer, [AuditInput(text=FRAUD)])
    acts = rt.auditor.activations(batch)[batch.content_mask]  # [N, d_in]
    with torch.inference_mode():
        feats = rt.auditor.sae.encode(acts)  # [N, d_sae]
    for f in rt.auditor.library.features:
        values = sorted({round(v, 4) for v in feats[:, f.index].tolist() if v > 0}, reverse=True)
        if len(values) >= 3:
            return f.name, f.index, (values[1] + values[2]) / 2
    raise AssertionError("no library feature is active on three tokens of the test text")


def _sidecar_files(root: Path) -> tuple[Path, Path]:
    """A random SAE for the default model and a policy folder with one quiet rule: (SAE, policy file)."""
    sae = make_random_sae(root / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post")
    pol = root / "policies"
    pol.mkdir()
    policy = pol / "viewer-test.yaml"
    policy.write_text(_policy_yaml("deception.fraud", 1e6))
    return sae, policy


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("viewer")
    sae, policy = _sidecar_files(root)
    pol = policy.parent
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in CORPUS))
    index_path = root / "index" / "feature_index.safetensors"
    settings = Settings.load(
        flags={
            "sae": str(sae),
            "policies": [str(pol)],
            "data_dir": str(root / "data"),
            "max_tokens": 128,
            "max_generate_tokens": 16,
            "viewer_index": str(index_path),
        },
        env={},
    )
    app = create_app(settings)
    with BackgroundServer(app) as srv:
        srv.wait_ready()
        rt = app.state.auditor.runtime
        index = build_index(
            rt.auditor,
            read_corpus(corpus),
            out=index_path,
            config=IndexConfig(contexts=4, before=8, after=3),
            batch_docs=4,
            meta={"sae": "random-64", "corpus": corpus.name},
        )
        feature, latent, threshold = _pick_rule(rt)
        policy.write_text(_policy_yaml(feature, threshold))
        reload = httpx.post(srv.url + "/v1/policies/reload", timeout=30)
        assert reload.status_code == 200 and reload.json()["changed"], reload.text
        yield Site(srv.url, app, index, feature, latent, threshold, index_path)


def _get(site: Site, path: str, **kw: Any) -> httpx.Response:
    return httpx.get(site.url + path, timeout=30, **kw)


# ---------------------------------------------------------------- pages over HTTP


@pytest.mark.parametrize("path", ["/ui/features", "/ui/features/12", "/ui/playground", "/ui/alerts"])
def test_pages_are_self_contained(site: Site, path: str) -> None:
    resp = _get(site, path)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    # Nothing the page loads lives off this origin (no CDN, no web fonts).
    refs = re.findall(r'(?:src|href|action)="([^"]*)"', resp.text)
    assert refs and all(r.startswith(("/", "#", "data:")) for r in refs), refs
    assert "<script>" not in resp.text  # inline scripts would be blocked by the CSP
    for ref in refs:
        if ref.startswith("/ui/static/"):
            assert _get(site, ref).status_code == 200, ref


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/ui/static/viewer.css", 200),
        ("/ui/static/..%2Fweb.py", 404),
        ("/ui/static/.hidden.js", 404),
        ("/ui/static/nope.js", 404),
        ("/ui/features/64", 404),
        ("/ui/features/not.a.feature", 404),
    ],
)
def test_static_files_and_unknown_latents(site: Site, path: str, status: int) -> None:
    assert _get(site, path).status_code == status


def test_feature_name_and_index_form_redirect(site: Site) -> None:
    by_name = _get(site, "/ui/features/deception.fraud")
    assert by_name.status_code == 307 and by_name.headers["location"] == "/ui/features/12"
    jump = _get(site, "/ui/features", params={"latent": "#40"})
    assert jump.status_code == 303 and jump.headers["location"] == "/ui/features/40"
    bad = _get(site, "/ui/features", params={"latent": "999"})
    assert bad.status_code == 200 and "latent must be a number from 0 to 63" in bad.text


@pytest.mark.parametrize("latent", ["\u00b2", "\u0663", "\uff18\uff15", "1_0", "+3"])
def test_latent_ids_other_than_ascii_digits_are_not_latents(site: Site, latent: str) -> None:
    # "\u0663" and "\uff18\uff15" are 3 and 85 to int(); "\u00b2" passes str.isdigit() but not int().
    page = _get(site, f"/ui/features/{quote(latent)}")
    assert page.status_code == 404 and "unknown feature" in page.text  # the hint of any other name
    jump = _get(site, "/ui/features", params={"latent": latent})
    assert jump.status_code == 200 and "latent must be a number from 0 to 63" in jump.text


def _result_names(page: str) -> list[str]:
    table = page[page.index('id="feature-table"') : page.index("</table>")]
    return re.findall(r'class="feature-link" href="/ui/features/\d+">([^<]+)</a>', table)


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"q": "phish"}, ["deception.phishing"]),
        ({"q": "IMPERSONATE"}, ["deception.phishing"]),  # description, any case
        ({"q": "fraud", "category": "bias"}, []),
        ({"q": "zzz-nothing"}, []),
    ],
)
def test_search_filters_on_the_server(site: Site, params: dict[str, str], names: list[str]) -> None:
    assert _result_names(_get(site, "/ui/features", params=params).text) == names


def test_search_by_category_lists_the_category(site: Site) -> None:
    lib = site.app.state.auditor.runtime.auditor.library
    page = _get(site, "/ui/features", params={"category": "bias"}).text
    assert _result_names(page) == [f.name for f in lib.features if f.category == "bias"]


def test_feature_page_shows_index_statistics_and_the_rule(site: Site) -> None:
    page = _get(site, f"/ui/features/{site.latent}").text
    summary = site.index.latent(site.latent)
    assert summary.contexts, "the rule's feature fires on the test text, which is in the corpus"
    assert page.count('<li class="context">') == len(summary.contexts)
    assert f"{100 * summary.density:.2f}%" in page
    assert RULE in page and "viewer-test" in page  # the policy that uses it
    quiet = _get(site, "/ui/features/63").text
    assert "No loaded policy reads this latent" in quiet


def test_pages_say_when_the_index_is_missing_or_for_another_sae(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = site.index_path
    saved = tmp_path / "saved"
    saved.mkdir()
    for f in (live, live.with_suffix(".json")):
        shutil.move(f, saved / f.name)
    try:
        page = _get(site, f"/ui/features/{site.latent}").text
        assert "no feature index at" in page and "auditor index-features" in page
        assert "deception" in _get(site, "/ui/features").text  # the library still lists
        FeatureIndex.empty(10, IndexConfig(contexts=2), {"sae": "other"}).save(live)
        assert "the index has 10 latents but the SAE has 64" in _get(site, "/ui/features/3").text
        # An index of another SAE of the same width (as `serve --sae A --viewer-index INDEX_OF_B`) is refused.
        other = load_sae(str(make_random_sae(tmp_path / "other-sae", d_in=576, d_sae=64, seed=7)))
        fp = sae_fingerprint(other)
        FeatureIndex.empty(64, IndexConfig(contexts=2), {"sae": "other-sae", SAE_FINGERPRINT: fp}).save(live)
        with caplog.at_level(logging.WARNING, logger="auditor.viewer.web"):
            for path in ("/ui/features/3", "/ui/features"):
                page = _get(site, path).text
                assert "was built from another SAE (&#39;other-sae&#39;, weights sha256 " + fp[:12] in page, page
                assert "auditor index-features" in page and 'id="stats"' not in page
        assert [r for r in caplog.records if "was built from another SAE" in r.getMessage()]
        # One written before fingerprints: shown, with a note that only the width was checked.
        legacy = FeatureIndex.empty(64, IndexConfig(contexts=2), {"sae": "old"})
        legacy.tokens_seen = 5
        legacy.save(live)
        for path in ("/ui/features/3", "/ui/features"):
            page = _get(site, path).text
            assert 'id="index-note"' in page and "matched to the loaded SAE by width only" in page
        assert 'id="stats"' in _get(site, "/ui/features/3").text
    finally:
        for f in (live, live.with_suffix(".json")):
            f.unlink(missing_ok=True)
            shutil.move(saved / f.name, f)
    page = _get(site, f"/ui/features/{site.latent}").text
    assert 'id="contexts"' in page and 'id="index-note"' not in page  # built by build_index: fingerprint checked


def test_all_latents_table_pages_and_sorts(site: Site) -> None:
    page = _get(site, "/ui/features", params={"sort": "max"}).text
    rows = re.findall(r'<a href="/ui/features/(\d+)">\1</a>', page)
    top = torch.sort(site.index.max_act, descending=True, stable=True).indices[:50].tolist()
    assert [int(r) for r in rows] == top
    second = _get(site, "/ui/features", params={"page": 2}).text
    assert [int(r) for r in re.findall(r'<a href="/ui/features/(\d+)">\1</a>', second)] == list(range(50, 64))


def test_activations_api_matches_a_direct_encode(site: Site) -> None:
    rt = site.app.state.auditor.runtime
    latents = [site.latent, 0, 63]
    resp = httpx.post(site.url + "/ui/api/activations", json={"text": FRAUD, "latents": latents}, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    batch = tokenize_batch(rt.auditor.model.tokenizer, [AuditInput(text=FRAUD)])
    mask = batch.content_mask[0]
    with torch.inference_mode():
        want = rt.auditor.sae.encode(rt.auditor.activations(batch)[0][mask])  # [N, d_sae]
    assert [t["position"] for t in out["tokens"]] == mask.nonzero().flatten().tolist()
    assert [t["token"] for t in out["tokens"]] == [batch.tokens[0][p] for p in mask.nonzero().flatten().tolist()]
    for lat in latents:
        torch.testing.assert_close(torch.tensor(out["latents"][str(lat)]), want[:, lat], atol=1e-4, rtol=0)
    # The same positions the audit's explanation uses.
    audit = httpx.post(site.url + "/v1/audit", json={"text": FRAUD, "explain": True}, timeout=60).json()
    assert [t["position"] for t in audit["tokens"]] == [t["position"] for t in out["tokens"]]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"text": "hi"}, "'latents' must be a list of 1 to 32"),
        ({"text": "hi", "latents": []}, "'latents' must be a list"),
        ({"text": "hi", "latents": [64]}, "latent indices in 0..63"),
        ({"text": "hi", "latents": [True]}, "latent indices"),
        ({"text": "hi", "latents": list(range(33))}, "1 to 32"),
        ({"latents": [1]}, "exactly one of"),
        ([1, 2], "JSON object"),
    ],
)
def test_activations_api_rejects_bad_requests(site: Site, body: Any, needle: str) -> None:
    resp = httpx.post(site.url + "/ui/api/activations", json=body, timeout=30)
    assert resp.status_code == 422 and needle in resp.json()["error"]["message"], resp.text


def test_pages_while_loading_failed(tmp_path: Path) -> None:
    settings = Settings.load(flags={"sae": str(tmp_path / "no-such-sae"), "data_dir": str(tmp_path)}, env={})
    app = create_app(settings)
    with BackgroundServer(app) as srv:
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/healthz").status_code != 503:
            assert time.monotonic() < deadline, "loading should fail on the missing SAE"
            time.sleep(0.05)
        for path in ("/ui/features", "/ui/features/3", "/ui/playground", "/ui/alerts"):
            resp = httpx.get(srv.url + path)
            assert resp.status_code == 503 and "The auditor failed to load" in resp.text and "no-such-sae" in resp.text
        assert httpx.post(srv.url + "/ui/api/activations", json={"text": "x", "latents": [1]}).status_code == 503


# ---------------------------------------------------------------- in the browser

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# CI installs the browser (scripts/install_test_deps.sh), so there a missing one fails the tests
# instead of skipping them.
browser_needed = pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
    reason="needs Debian chromium and chromium-driver (scripts/install_test_deps.sh)",
)


def _shots() -> Path:
    # The docs screenshots are refreshed with AUDITOR_VIEWER_SCREENSHOTS=docs/viewer; an ordinary
    # run writes them to a temporary folder so the work tree stays clean.
    default = Path(tempfile.gettempdir()) / "auditor-viewer-screenshots"
    folder = Path(os.environ.get("AUDITOR_VIEWER_SCREENSHOTS", default))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,860",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, cond: Callable[[Any], Any], timeout: float = 30.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)


def _screenshot(driver: Any, name: str) -> None:
    """Save the page (up to 1,500 px of it) as ``<shots>/<name>.png``."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    chrome = driver.get_window_size()["height"] - int(driver.execute_script("return window.innerHeight"))
    driver.set_window_size(1200, min(max(height, 600), 1500) + chrome)
    driver.execute_script("window.scrollTo(0, 0)")
    try:
        driver.save_screenshot(str(_shots() / f"{name}.png"))
    finally:
        driver.set_window_size(1200, 860)


def _texts(driver: Any, css: str) -> list[str]:
    """Text of every element matching ``css``, read in one script (no stale references while the page updates)."""
    return list(driver.execute_script("return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent)", css))


def _console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


@browser_needed
def test_browser_search_finds_a_library_feature(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site.url + "/ui/features")
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("/")  # the search shortcut
    search = browser.switch_to.active_element
    assert search.get_attribute("id") == "q"
    search.send_keys("fraud")
    _wait(browser, lambda d: _texts(d, "a.feature-link") == ["deception.fraud"])
    assert "1 of" in browser.find_element(By.ID, "result-count").text
    assert browser.current_url.endswith("/ui/features?q=fraud&category=")
    _screenshot(browser, "features")
    search.send_keys(Keys.ARROW_DOWN)  # keyboard: from the search box into the results
    link = browser.switch_to.active_element
    assert link.text == "deception.fraud"
    link.send_keys(Keys.ENTER)
    _wait(browser, lambda d: d.current_url.endswith("/ui/features/12"))
    assert "deception.fraud" in browser.find_element(By.TAG_NAME, "h1").text
    assert _console_errors(browser) == []


@browser_needed
def test_browser_feature_page_shows_contexts(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    from selenium.webdriver.common.keys import Keys

    browser.get(f"{site.url}/ui/features/{site.latent}")
    # Keyboard: the first Tab reaches the skip link, which moves focus to the content.
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    skip = browser.switch_to.active_element
    assert skip.text == "Skip to content"
    skip.send_keys(Keys.ENTER)
    assert browser.switch_to.active_element.get_attribute("id") == "main"
    contexts = browser.find_elements(By.CSS_SELECTOR, "#contexts li.context")
    summary = site.index.latent(site.latent)
    assert len(contexts) == len(summary.contexts) > 0
    first = contexts[0].find_element(By.CSS_SELECTOR, ".tokens")
    assert first.text.replace("\n", "") == "".join(t for t, _ in summary.contexts[0].tokens).replace("\n", "")
    peak = contexts[0].find_element(By.CSS_SELECTOR, ".tok.peak")
    assert "lv8" in peak.get_attribute("class") or summary.contexts[0].max_activation < summary.max_activation
    assert browser.find_elements(By.CSS_SELECTOR, "figure.hist rect.bar")
    assert RULE in browser.find_element(By.ID, "uses").text
    # Without a pointer: Tab reaches the first context (one stop per context), focus starts on its
    # peak token, and the arrow keys walk its tokens while the readout says each value.
    for _ in range(40):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        if "tokens" in (browser.switch_to.active_element.get_attribute("class") or ""):
            break
    row = browser.switch_to.active_element
    assert row == first
    readout = browser.find_element(By.ID, "context-readout")
    spans = first.find_elements(By.CSS_SELECTOR, ".tok")
    peak_at = next(i for i, t in enumerate(spans) if "peak" in t.get_attribute("class"))
    assert readout.text == f"\u201c{spans[peak_at].get_attribute('textContent')}\u201d {spans[peak_at].get_attribute('title')}".strip()
    row.send_keys(Keys.HOME)
    row.send_keys(Keys.ARROW_RIGHT)
    assert "active" in spans[1].get_attribute("class") and "active" not in spans[0].get_attribute("class")
    assert readout.text.endswith(spans[1].get_attribute("title")) and spans[1].get_attribute("title")
    row.send_keys(Keys.END)
    assert "active" in spans[-1].get_attribute("class")
    _screenshot(browser, "feature")
    assert _console_errors(browser) == []


@browser_needed
def test_browser_playground_highlights_the_trigger_tokens(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    expected = httpx.post(site.url + "/v1/audit", json={"text": FRAUD, "id": "expected"}, timeout=60).json()
    [match] = expected["matches"]
    [leaf] = [x for x in match["explanation"] if x["fired"]]
    positions = {p for a, b in leaf["token_spans"] for p in range(a, b)}
    assert 0 < len(positions) < expected["n_tokens"]

    browser.get(site.url + "/ui/playground")
    browser.find_element(By.ID, "input").send_keys(FRAUD)
    browser.find_element(By.ID, "audit-button").click()
    _wait(browser, lambda d: d.find_element(By.ID, "verdict").text == "alert")
    assert RULE in browser.find_element(By.ID, "matches").text
    trig = browser.find_elements(By.CSS_SELECTOR, "#heatmap .tok.trig")
    assert {int(t.get_attribute("data-position")) for t in trig} == positions
    assert "".join(t.get_attribute("textContent") for t in trig) == "".join(leaf["span_texts"])
    # The rule's feature is preselected and shades its strongest tokens most.
    selected = Select(browser.find_element(By.ID, "heat-feature")).first_selected_option
    assert site.feature in selected.text
    _wait(browser, lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-latent") == str(site.latent))
    shaded = browser.find_elements(By.CSS_SELECTOR, "#heatmap .tok")
    above = {int(t.get_attribute("data-position")) for t in shaded if float(t.get_attribute("data-activation")) >= site.threshold}
    assert above == positions  # the outlined tokens are exactly where the rule's feature reached its threshold
    assert all("lv0" not in t.get_attribute("class") for t in trig)
    # The heat map reads with the keyboard too: End goes to the last token, its value in the readout.
    heatmap = browser.find_element(By.ID, "heatmap")
    browser.execute_script("arguments[0].focus()", heatmap)
    heatmap.send_keys(Keys.END)
    readout = browser.find_element(By.ID, "heat-readout").text
    assert shaded[-1].get_attribute("title") and readout.endswith(shaded[-1].get_attribute("title"))
    assert readout.startswith("\u201c")

    browser.find_element(By.ID, "steer-toggle").click()
    Select(browser.find_element(By.ID, "steer-feature")).select_by_value(site.feature)
    tokens = browser.find_element(By.ID, "steer-tokens")
    tokens.clear()
    tokens.send_keys("6")
    browser.find_element(By.ID, "steer-button").click()
    _wait(browser, lambda d: d.find_element(By.ID, "steer-status").text.startswith(("Generated", "Generation failed")), 60)
    assert browser.find_element(By.ID, "steer-status").text.startswith("Generated"), browser.find_element(By.ID, "steer-status").text
    assert browser.find_element(By.ID, "default-text").text
    _screenshot(browser, "playground")
    assert _console_errors(browser) == []


@browser_needed
def test_browser_alert_appears_on_the_live_page(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(site.url + "/ui/alerts")
    _wait(browser, lambda d: d.find_element(By.ID, "stream-state").text == "live")
    request_id = f"live-{time.time_ns()}"
    resp = httpx.post(site.url + "/v1/audit", json={"text": FRAUD, "id": request_id}, timeout=60)
    assert resp.json()["verdict"] == "alert"
    row = _wait(
        browser,
        lambda d: next((r for r in d.find_elements(By.CSS_SELECTOR, "#alerts-body tr") if request_id in r.text), False),
    )
    assert RULE in row.text and "high" in row.text
    assert row == browser.find_elements(By.CSS_SELECTOR, "#alerts-body tr")[0]  # newest first
    assert RULE in browser.find_element(By.ID, "alerts-live").get_attribute("textContent")  # announced
    _screenshot(browser, "alerts")
    assert _console_errors(browser) == []


@browser_needed
def test_browser_playground_audits_a_chat(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(site.url + f"/ui/playground?feature={site.feature}")
    browser.find_element(By.CSS_SELECTOR, "input[name=kind][value=chat]").click()
    box = browser.find_element(By.ID, "input")
    box.send_keys("user: Is it safe to pay a fee to claim a prize?")
    box.send_keys("\nassistant: " + FRAUD)
    browser.find_element(By.ID, "audit-button").click()
    _wait(browser, lambda d: d.find_element(By.ID, "verdict").text in ("allow", "alert"))
    expected = httpx.post(
        site.url + "/v1/audit",
        json={"messages": [{"role": "user", "content": "Is it safe to pay a fee to claim a prize?"}, {"role": "assistant", "content": FRAUD}], "explain": True},
        timeout=60,
    ).json()
    assert browser.find_element(By.ID, "verdict").text == expected["verdict"]
    # The heat map shows the chat's content tokens only (no template tokens), for the feature asked for in the URL.
    _wait(browser, lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-latent") == str(site.latent))
    assert _texts(browser, "#heatmap .tok") == [t["token"] for t in expected["tokens"]]
    assert "<|im_start|>" not in browser.find_element(By.ID, "heatmap").text
    assert _console_errors(browser) == []


# ---------------------------------------------------------------- sign-in with --auth-all-routes

TOKEN = "viewer-s3cret"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A sidecar whose every route needs the API token (the viewer signs in)."""
    root = tmp_path_factory.mktemp("locked")
    sae, policy = _sidecar_files(root)
    pol = policy.parent
    settings = Settings.load(
        flags={"sae": str(sae), "policies": [str(pol)], "data_dir": str(root / "data"), "max_tokens": 128,
               "auth_all_routes": True},
        env={"AUDITOR_API_TOKEN": TOKEN},
    )
    with BackgroundServer(create_app(settings)) as srv:
        srv.wait_ready()
        yield srv.url


def test_locked_viewer_signs_in_with_the_token(locked: str) -> None:
    from auditor.server.auth import SESSION_COOKIE

    anon = httpx.get(locked + "/ui/features?q=fraud")
    assert anon.status_code == 303 and anon.headers["location"] == "/ui/login?next=%2Fui%2Ffeatures%3Fq%3Dfraud"
    assert httpx.get(locked + "/v1/policies").status_code == 401  # an API client still gets JSON 401
    assert httpx.get(locked + "/ui/static/viewer.css").status_code == 200
    page = httpx.get(locked + "/ui/login", params={"next": "/ui/features?q=fraud"})
    assert page.status_code == 200 and 'name="token"' in page.text and 'value="/ui/features?q=fraud"' in page.text

    wrong = httpx.post(locked + "/ui/login", data={"token": "guess", "next": "/ui/features"})
    assert wrong.status_code == 401 and "That is not this server" in wrong.text
    assert SESSION_COOKIE not in wrong.cookies and "guess" not in wrong.text

    # Signing in never redirects off this server.
    ok = httpx.post(locked + "/ui/login", data={"token": TOKEN, "next": "https://evil.example/x"})
    assert ok.status_code == 303 and ok.headers["location"] == "/ui/features"
    set_cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and TOKEN not in set_cookie
    with httpx.Client(base_url=locked, cookies={SESSION_COOKIE: ok.cookies[SESSION_COOKIE]}) as c:
        assert c.get("/ui/features").status_code == 200
        assert c.get("/v1/policies").status_code == 200
        assert c.post("/v1/audit", json={"text": FRAUD}).status_code == 401  # not from the viewer's script
        assert c.post("/v1/audit", json={"text": FRAUD}, headers={"X-Auditor-UI": "1"}).status_code == 200
        assert c.post("/v1/policies/reload", headers={"X-Auditor-UI": "1"}).status_code == 401  # mutating: token only
        assert c.post("/v1/policies/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        out = c.post("/ui/logout")
        assert out.status_code == 303 and f"{SESSION_COOKIE}=" in out.headers["set-cookie"] and "Max-Age=0" in out.headers["set-cookie"]
    forged = httpx.get(locked + "/ui/features", cookies={SESSION_COOKIE: "0" * 64})
    assert forged.status_code == 303


@browser_needed
def test_browser_signs_in_and_audits_in_the_playground(locked: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(locked + "/ui/playground")
    _wait(browser, lambda d: "/ui/login" in d.current_url)
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    _wait(browser, lambda d: d.current_url.endswith("/ui/playground"))
    browser.find_element(By.ID, "input").send_keys(FRAUD)
    browser.find_element(By.ID, "audit-button").click()
    _wait(browser, lambda d: d.find_element(By.ID, "verdict").text in ("allow", "alert", "block"))
    browser.find_element(By.CSS_SELECTOR, "form.signout button").click()
    _wait(browser, lambda d: "/ui/login" in d.current_url)
    browser.get(locked + "/ui/alerts")
    _wait(browser, lambda d: "/ui/login" in d.current_url)  # signed out: back to the sign-in page
