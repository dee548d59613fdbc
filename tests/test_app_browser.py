"""End to end in a real browser: `atlas app` serves the app against the populated test store, headless Chromium
(Debian's `chromium` + `chromium-driver`) driven by Selenium visits every page, runs the path query, validates its
circuit and runs one intervention, names a feature on the Features page and finds that label on the prompt graph and
in the paths table, checks what is rendered, and saves a screenshot of each page under `test-artifacts/screenshots/`.

Skips (with the reason) only when Chromium or its driver is not installed; `make test` installs both.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from neo4j import Driver
from test_app import AtlasFixture, atlas_store, global_circuits_store  # noqa: F401  (session fixture shared with the AppTest tests)

from atlas.storage.neo4j_server import free_loopback_port

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
LABEL = "planted source (browser)"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium not installed (apt-get install chromium chromium-driver; `make system-deps` does it)",
)


@pytest.fixture(scope="module")
def app_url(atlas_store: AtlasFixture, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    """`atlas app` on a free port, started against the fixture store; stopped (and waited for) afterwards."""
    port = free_loopback_port()
    env = {k: v for k, v in os.environ.items() if k != "NEO4J_URI"}
    env.update(atlas_store.env())
    log = (tmp_path_factory.mktemp("app-log") / "streamlit.log").open("wb")
    atlas = Path(sys.executable).with_name("atlas")
    cmd = [str(atlas), "app", "--port", str(port), "--neo4j-uri", atlas_store.connection.uri, "--stats-db",
           str(atlas_store.stats_db), "--transcoders", str(atlas_store.transcoder_dir)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path_factory.mktemp("cwd"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"atlas app did not start: {Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1600,2200", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_text(driver: object, text: str, timeout: float = 90) -> None:
    """Wait until `text` is in the page's visible text (Streamlit renders asynchronously over a websocket)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        lambda d: text in d.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
    )


def wait_idle(driver: object, timeout: float = 120) -> None:
    """Wait until the app has finished its current run (Streamlit shows a status widget while running)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    time.sleep(1.0)
    WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']")  # type: ignore[attr-defined]
    )
    time.sleep(0.5)


def page_text(driver: object) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)  # type: ignore[attr-defined]


def no_errors(driver: object) -> None:
    from selenium.webdriver.common.by import By

    assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")  # type: ignore[attr-defined]
    text = page_text(driver)
    assert "Traceback" not in text
    alerts = driver.find_elements(By.CSS_SELECTOR, "[data-testid='stAlertContentError']")  # type: ignore[attr-defined]
    assert not alerts, [a.text for a in alerts]


def shot(driver: object, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    assert path.stat().st_size > 10_000
    return path


def by_label(driver: object, tag: str, label: str) -> object:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"{tag}[aria-label='{label}']")  # type: ignore[attr-defined]


def click_button(driver: object, text: str) -> None:
    from selenium.webdriver.common.by import By

    button = driver.find_element(By.XPATH, f"//button[.//p[normalize-space()='{text}']]")  # type: ignore[attr-defined]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)  # type: ignore[attr-defined]
    button.click()


def click_tab(driver: object, text: str) -> None:
    from selenium.webdriver.common.by import By

    tabs = driver.find_elements(By.CSS_SELECTOR, "[data-testid='stTab']")  # type: ignore[attr-defined]
    tab = next(t for t in tabs if t.text.strip() == text)
    driver.execute_script("arguments[0].click();", tab)  # type: ignore[attr-defined]


def commit(element: object) -> None:
    """Type into a Streamlit text area and commit it (Ctrl+Enter), as a user would before clicking."""
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, Keys.ENTER)  # type: ignore[attr-defined]


def test_every_page_in_a_real_browser(
    app_url: str,
    browser: object,
    atlas_store: AtlasFixture,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    neo4j_driver: Driver,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    one = atlas_store.one_hop

    # 1. Overview
    d.get(f"{app_url}/overview")  # type: ignore[attr-defined]
    wait_text(d, "Atlas overview")
    wait_text(d, "Graph scores")
    wait_idle(d)
    no_errors(d)
    assert "attribution edges" in page_text(d)
    assert len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 2  # type: ignore[attr-defined]
    shot(d, "1-overview")

    # 2. Features: the dashboard of the planted path's source feature
    d.get(f"{app_url}/features?feature={one.source_key}")  # type: ignore[attr-defined]
    wait_text(d, f"Feature {one.source_key}")
    wait_text(d, "Prompts where it matters")
    wait_idle(d)
    no_errors(d)
    text = page_text(d)
    assert "density (active tokens)" in text and "Top activating examples" in text
    # name the feature: the label is then what the graph, the paths table and the pickers show
    assert "automatic label" in text  # ingest gave it one
    expander = d.find_element(By.XPATH, "//details[.//summary[.//p[normalize-space()='Edit label']]]/summary")  # type: ignore[attr-defined]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", expander)  # type: ignore[attr-defined]
    expander.click()
    box = by_label(d, "input", "Label (at most 80 characters)")
    box.send_keys(Keys.CONTROL, "a")  # type: ignore[attr-defined]
    box.send_keys(LABEL, Keys.ENTER)  # type: ignore[attr-defined]
    wait_idle(d)
    click_button(d, "Save label")
    wait_text(d, f"saved: {LABEL}")
    wait_idle(d)
    no_errors(d)
    shot(d, "2-features")

    # 3. Prompt graph of the planted path's prompt
    d.get(f"{app_url}/prompt_graph?prompt={one.prompt_id}&node={one.node_ids[0]}")  # type: ignore[attr-defined]
    wait_text(d, "click a node for detail")
    wait_idle(d)
    no_errors(d)
    wait_text(d, f"{one.node_ids[0]} (feature)")  # ?node= opened the linked node's detail ...
    wait_text(d, f"Label: {LABEL}")  # ... with the label set on the Features page
    n_nodes = atlas_store.graphs[one.prompt_id].nodes.num_rows
    assert f"showing {n_nodes} of {n_nodes} nodes" in page_text(d)
    points = d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .point")  # type: ignore[attr-defined]
    assert len(points) >= n_nodes
    # click a logit node in the graph: the selection reruns the page and the node detail shows that node
    from selenium.webdriver.common.action_chains import ActionChains

    logit_points = d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace:last-child .point")  # type: ignore[attr-defined]
    assert logit_points
    ActionChains(d).move_to_element(logit_points[0]).click().perform()
    wait_text(d, "(logit)")
    wait_idle(d)
    no_errors(d)
    shot(d, "3-prompt-graph")

    # 4. Paths: the planted one-hop path
    d.get(f"{app_url}/paths")  # type: ignore[attr-defined]
    wait_text(d, "Find paths")
    wait_idle(d)
    sources = by_label(d, "textarea", "More source features (one per line)")
    sources.send_keys(one.source_key)  # type: ignore[attr-defined]
    commit(sources)
    targets = by_label(d, "textarea", "Target tokens")
    targets.send_keys(one.target)  # type: ignore[attr-defined]
    commit(targets)
    hops = by_label(d, "input", "Hop limit")
    hops.send_keys(Keys.CONTROL, "a")  # type: ignore[attr-defined]
    hops.send_keys("1", Keys.ENTER)  # type: ignore[attr-defined]
    wait_idle(d)
    click_button(d, "Find paths")
    wait_text(d, "path(s) in")
    wait_idle(d)
    no_errors(d)
    text = page_text(d)
    assert f"Strongest: {' → '.join(one.node_ids)} in prompt {one.prompt_id}" in text
    assert "Merged view (all prompts)" in text
    table = d.find_element(By.CSS_SELECTOR, "[data-testid='stDataFrame']")  # type: ignore[attr-defined]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", table)  # type: ignore[attr-defined]
    cells = str(d.execute_script("return arguments[0].textContent;", table))  # type: ignore[attr-defined]
    assert LABEL in cells  # the "source label" and "path labels" columns of the ranked table
    shot(d, "4-paths")
    # ... and validate it: the circuit (its source feature) against 5 null sets per prompt, plotted and stored
    for name, value in (("Circuit size (features)", "1"), ("Null sets per prompt", "5")):
        box = by_label(d, "input", name)
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)  # type: ignore[attr-defined]
        box.send_keys(Keys.CONTROL, "a")  # type: ignore[attr-defined]
        box.send_keys(value, Keys.ENTER)  # type: ignore[attr-defined]
        wait_idle(d)
    click_button(d, "Validate")
    wait_text(d, "beats its nulls on", timeout=180)
    wait_idle(d)
    no_errors(d)
    text = page_text(d)
    assert "mean necessity" in text and "stored as validation-" in text
    assert len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 4  # type: ignore[attr-defined]
    shot(d, "4b-validation")

    # 5. Cypher console: a write is refused, a read returns rows
    d.get(f"{app_url}/cypher")  # type: ignore[attr-defined]
    wait_text(d, "Read-only")
    wait_idle(d)
    box = by_label(d, "textarea", "Query")
    box.send_keys("CREATE (n:FromBrowser) RETURN n")  # type: ignore[attr-defined]
    commit(box)
    wait_idle(d)
    click_button(d, "Run")
    wait_text(d, "Rejected: CREATE is not allowed")
    box = by_label(d, "textarea", "Query")
    box.send_keys(Keys.CONTROL, "a")  # type: ignore[attr-defined]
    box.send_keys(  # type: ignore[attr-defined]
        f"MATCH (p:Prompt) WHERE p.transcoder = '{atlas_store.transcoder_id}' RETURN p.id AS id"
    )
    commit(box)
    wait_idle(d)
    click_button(d, "Run")
    wait_text(d, f"{len(atlas_store.graphs)} row(s) in")
    wait_idle(d)
    no_errors(d)
    shot(d, "5-cypher")

    # 6. Interventions: ablate the planted feature in constrained mode
    d.get(f"{app_url}/interventions?prompt={one.prompt_id}")  # type: ignore[attr-defined]
    wait_text(d, "Run intervention")
    wait_idle(d)
    layer, feature, position = one.node_ids[0].split("_")
    picker = d.find_element(  # type: ignore[attr-defined]
        By.XPATH, "//div[@data-testid='stMultiSelect'][.//*[contains(text(),'Feature activations')]]//input"
    )
    picker.send_keys(f"L{layer} #{feature} @{position} ")
    picker.send_keys(Keys.ENTER)
    picker.send_keys(Keys.ESCAPE)
    wait_idle(d)
    click_button(d, "Run intervention")
    wait_text(d, "max |Δ probability|", timeout=180)
    wait_text(d, "Continuation with the intervention")
    wait_idle(d)
    no_errors(d)
    values = [e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid='stMetricValue']")]  # type: ignore[attr-defined]
    assert values[0] == "1"  # one edit
    assert float(values[1]) > 0  # the intervention changed the next-token distribution
    shot(d, "6-interventions")

    # 7. Global circuits: global weights, motifs and clusters made by the CLI, then the feature / motif / cluster views
    for name, value in atlas_store.env().items():
        monkeypatch.setenv(name, value)
    global_circuits_store(atlas_store, monkeypatch)
    try:
        d.get(f"{app_url}/global?feature={one.source_key}")  # type: ignore[attr-defined]
        wait_text(d, "Strongest global outputs")
        wait_text(d, "Motifs through this feature")
        wait_idle(d)
        no_errors(d)
        assert len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 1  # type: ignore[attr-defined]
        shot(d, "7-global-feature")
        click_tab(d, "Motifs by support")
        wait_text(d, "prompts mined")
        wait_idle(d)
        no_errors(d)
        shot(d, "7-global-motifs")
        click_tab(d, "Prompt clusters")
        wait_text(d, "unclustered")
        wait_idle(d)
        no_errors(d)
        shot(d, "7-global-clusters")
    finally:
        from neo4j import GraphDatabase

        c = atlas_store.connection
        with GraphDatabase.driver(c.uri, auth=(c.user, c.password)) as driver:
            driver.execute_query("MATCH (n) WHERE n:Motif OR n:MotifRun OR n:Cluster OR n:ClusterRun DETACH DELETE n",
                                 database_=c.database)  # fmt: skip
    neo4j_driver.execute_query("MATCH (v:Validation {transcoder: $tc}) DETACH DELETE v",
                               tc=atlas_store.transcoder_id, database_=atlas_store.connection.database)  # fmt: skip
