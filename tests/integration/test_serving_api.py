"""The serving API over real HTTP, on MLflow's real registry: predictions, validation, the model swap."""

from __future__ import annotations

import json
import math
import re
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from openapi_spec_validator import validate

from health_mlops.data.hospital import load_hospitals
from health_mlops.data.preprocess import GlobalPreprocessing, Preprocessor, feature_histograms, stats_of_frame
from health_mlops.data.synthetic import generate_dataset
from health_mlops.ml.evaluate import predict_frame
from health_mlops.ml.model import build_model, weights_as_numpy
from health_mlops.ml.onnx import export_onnx
from health_mlops.ml.site_calibration import SiteCalibration
from health_mlops.ml.train import train_model
from health_mlops.ml.train_config import TrainConfig
from health_mlops.registry import CHAMPION, QualityGate, Registry, TrainingRecord
from health_mlops.serving.answers import BatchAnswer, ErrorAnswer, ModelAnswer, PredictAnswer
from health_mlops.serving.api import create_serving_app
from health_mlops.serving.model import ChampionWatcher
from health_mlops.spec import load_spec, spec_to_yaml
from health_mlops.trust.audit import AuditLog
from health_mlops.web.server import BackgroundServer
from tests.conftest import with_empty_mlflow_db

pytestmark = pytest.mark.process

SPEC = load_spec("health-risk")


@pytest.fixture(scope="session")
def patients(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("serving-data")
    generate_dataset(root, n_hospitals=1, rows_per_hospital=400, seed=2, split_seed=42, test_fraction=0.2)
    frame = load_hospitals(root, SPEC)["hospital-1"].frame
    return json.loads(frame.drop(columns=[SPEC.target.name]).to_json(orient="records"))


def trained(frame_rows: list[dict], seed: int, sites: dict[str, SiteCalibration] | None = None
            ) -> tuple[bytes, list[float]]:
    """A small model trained on the rows, as ONNX (with `sites`' recalibrations), and its own (torch)
    predictions for them."""
    import pandas as pd

    frame = pd.DataFrame(frame_rows).assign(**{SPEC.target.name: ["1" if i % 7 == 0 else "0"
                                                                  for i in range(len(frame_rows))]})
    preprocessor = Preprocessor.from_stats(SPEC, stats_of_frame(frame, SPEC)).with_ranges_of(frame)
    model = build_model(SPEC.model, len(preprocessor.mean), seed=seed)
    train_model(model, preprocessor.features(frame), preprocessor.target(frame), SPEC.task,
                TrainConfig(epochs=1, learning_rate=0.01, batch_size=64, seed=seed))
    histograms = {name: counts.tolist() for name, counts in feature_histograms(frame, SPEC).items()}
    preprocessing = GlobalPreprocessing(count=len(frame), mean=preprocessor.mean.tolist(),
                                        scale=preprocessor.scale.tolist(), threshold=THRESHOLD, histograms=histograms)
    body = export_onnx(SPEC, preprocessing, weights_as_numpy(model), sites=sites)
    return body, predict_frame(model, preprocessor, frame).tolist()


THRESHOLD = 1 / 7  # the training rows' event rate: what a run chooses when the spec sets none


def register(registry: Registry, onnx_model: bytes, name: str, auc: float) -> int:
    record = TrainingRecord(federation_run=name, params={}, round_metrics=[], hospital_metrics=[],
                            final_metrics={"auc": auc}, metric_name="auc", onnx_model=onnx_model,
                            spec_yaml=spec_to_yaml(SPEC))
    return registry.register(record, gate=QualityGate(tolerance=0.0)).version


@pytest.fixture
def serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path
            ) -> Iterator[tuple[str, Registry]]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with_empty_mlflow_db(tmp_path, empty_mlflow_db)
    registry = Registry(tmp_path, SPEC.name)
    watcher = ChampionWatcher(Registry(tmp_path, SPEC.name), poll_s=0.1)
    with BackgroundServer(create_serving_app(SPEC, watcher)) as server:
        yield server.url, registry


def test_without_a_champion_predict_says_503_and_the_spec_is_served(serving: tuple[str, Registry],
                                                                     patients: list[dict]) -> None:
    url, _ = serving
    response = httpx.post(f"{url}/api/v1/predict", json=patients[0])
    assert response.status_code == 503 and "no champion" in response.json()["detail"]
    model = httpx.get(f"{url}/api/v1/model").json()
    assert model["version"] is None
    heart_rate = next(f for f in model["spec"]["features"] if f["name"] == "heart_rate")
    assert heart_rate["type"] == "numeric" and heart_rate["min"] is not None and heart_rate["unit"]


def test_predictions_match_the_trained_model_and_carry_the_version(serving: tuple[str, Registry],
                                                                     patients: list[dict]) -> None:
    url, registry = serving
    onnx_model, expected = trained(patients, seed=0)
    version = register(registry, onnx_model, "run-a", 0.8)
    wait_for_version(url, version)
    one = httpx.post(f"{url}/api/v1/predict", json=patients[0]).json()
    assert one["model_version"] == version and one["task"] == "binary"
    assert one["prediction"] == pytest.approx(expected[0], rel=1e-4)
    assert one["threshold"] == pytest.approx(THRESHOLD) and one["class"] == int(one["prediction"] >= THRESHOLD)
    batch = httpx.post(f"{url}/api/v1/predict/batch", json={"rows": patients}, timeout=30).json()
    np.testing.assert_allclose(batch["predictions"], expected, rtol=1e-4, atol=1e-6)
    assert batch["classes"] == [int(p >= THRESHOLD) for p in batch["predictions"]] and 0 < sum(batch["classes"])
    described = httpx.get(f"{url}/api/v1/model").json()
    assert described["version"] == version and described["decision_threshold"] == pytest.approx(THRESHOLD)
    assert 'health_mlops_predictions_total{endpoint="predict",outcome="ok"} 1.0' in httpx.get(f"{url}/metrics").text


def test_the_openapi_document_is_valid_complete_and_says_what_each_route_answers(serving: tuple[str, Registry],
                                                                               patients: list[dict]) -> None:
    url, registry = serving
    document = httpx.get(f"{url}/openapi.json").json()
    validate(document)  # the OpenAPI 3.1 structure, as generators read it
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs and refs <= set(schemas), f"references to nothing: {sorted(refs - set(schemas))}"
    for path in ("/api/v1/predict", "/api/v1/predict/batch", "/api/v1/model"):
        (operation,) = document["paths"][path].values()
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"], path
    # What the routes answer is what the document says.
    onnx_model, _ = trained(patients, seed=0)
    wait_for_version(url, register(registry, onnx_model, "run-a", 0.8))
    PredictAnswer.model_validate(httpx.post(f"{url}/api/v1/predict?explain=true", json=patients[0]).json())
    BatchAnswer.model_validate(httpx.post(f"{url}/api/v1/predict/batch", json={"rows": patients[:3]}).json())
    ModelAnswer.model_validate(httpx.get(f"{url}/api/v1/model").json())
    ErrorAnswer.model_validate(httpx.post(f"{url}/api/v1/predict", json={**patients[0], "age": 400}).json())


def wait_for_version(url: str, version: int, timeout_s: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/api/v1/model").json()["version"] != version:
        assert time.monotonic() < deadline, f"v{version} was never served"
        time.sleep(0.05)


def test_an_explained_prediction_names_its_main_features_and_drift_is_exported(serving: tuple[str, Registry],
                                                                             patients: list[dict]) -> None:
    url, registry = serving
    onnx_model, _ = trained(patients, seed=0)
    wait_for_version(url, register(registry, onnx_model, "run-a", 0.8))
    answer = httpx.post(f"{url}/api/v1/predict?explain=true", json=patients[0]).json()
    contributions = answer["contributions"]
    assert len(contributions) == 5 and {c["feature"] for c in contributions} <= {f.name for f in SPEC.features}
    sizes = [abs(c["contribution"]) for c in contributions]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 0
    assert "contributions" not in httpx.post(f"{url}/api/v1/predict", json=patients[0]).json()
    assert "health_mlops_feature_drift_score{" not in httpx.get(f"{url}/metrics").text  # too few rows yet
    httpx.post(f"{url}/api/v1/predict/batch", json={"rows": patients}, timeout=30).raise_for_status()
    exported = httpx.get(f"{url}/metrics").text
    assert 'health_mlops_feature_drift_score{feature="age"}' in exported
    assert "health_mlops_drift_window_rows 402.0" in exported


def test_invalid_fields_are_named_with_their_allowed_values(serving: tuple[str, Registry],
                                                           patients: list[dict]) -> None:
    url, _ = serving
    response = httpx.post(f"{url}/api/v1/predict", json={**patients[0], "spo2": 150})
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"][-1] == "spo2" and "100" in error["msg"]
    response = httpx.post(f"{url}/api/v1/predict", json={**patients[0], "smoker": "sometimes"})
    assert response.status_code == 422 and "never" in response.text and "smoker" in response.text


@pytest.mark.parametrize("body", [
    b"", b"null", b"[]", b"{}", b"not json", b'{"heart_rate": "fast"}', b'{"rows": []}', b'{"rows": "x"}',
    b'{"rows": [null]}', b'{"heart_rate": NaN}', b'{"heart_rate": 1e400}', b'{"heart_rate": [1, 2]}',
    b'{"rows": [' + b"{}," * 300_000 + b"{}]}", b"[" * 10_000, b'{"extra_field": 1}',
])
def test_garbage_never_gets_a_5xx(serving: tuple[str, Registry], patients: list[dict], body: bytes) -> None:
    url, _ = serving
    for path in ("/api/v1/predict", "/api/v1/predict/batch"):
        response = httpx.post(f"{url}{path}", content=body, headers={"Content-Type": "application/json"},
                              timeout=60)
        assert response.status_code < 500, (path, body[:40], response.text[:200])
    mixed = {**patients[0], "age": "forty"}
    assert httpx.post(f"{url}/api/v1/predict/batch", json={"rows": [patients[1], mixed]}).status_code == 422


def test_only_a_body_declared_json_is_read(serving: tuple[str, Registry], patients: list[dict]) -> None:
    url, _ = serving
    body = json.dumps(patients[0]).encode()
    for path, payload in (("/api/v1/predict", body), ("/api/v1/predict/batch", b'{"rows": [' + body + b"]}")):
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"):
            headers = {"Content-Type": content_type} if content_type else {}
            response = httpx.post(f"{url}{path}", content=payload, headers=headers)
            assert response.status_code == 415 and "application/json" in response.json()["detail"], content_type
        declared = httpx.post(f"{url}{path}", content=payload,
                              headers={"Content-Type": "Application/JSON; charset=utf-8"})
        # read and validated, then refused only for want of a champion (this server has none)
        assert declared.status_code == 503 and "champion" in declared.text, declared.text


def test_a_new_champion_is_swapped_in_under_load_without_a_failed_request(serving: tuple[str, Registry],
                                                                         patients: list[dict]) -> None:
    url, registry = serving
    first, _ = trained(patients, seed=0)
    second, _ = trained(patients, seed=1)
    v1 = register(registry, first, "run-a", 0.8)
    wait_for_version(url, v1)
    failures: list[str] = []
    versions: set[int] = set()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=url) as client:
            while not stop.is_set():
                response = client.post("/api/v1/predict", json=patients[0])
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    versions.add(response.json()["model_version"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        v2 = register(registry, second, "run-b", 0.9)
        wait_for_version(url, v2)
        import time

        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert versions == {v1, v2}


def test_the_serving_app_imports_no_torch() -> None:
    import subprocess
    import sys

    # The serving image has no torch: the dashboard, the API and `start-run` (a run's configuration) must not need it.
    code = ("import sys, health_mlops.serving.app, health_mlops.cli; from health_mlops.spec import load_spec; "
            "from health_mlops.fl.run_config import federated_run_config; "
            "federated_run_config(load_spec('health-risk'), 2); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_the_dashboard_command_serves_the_api_to_role_bound_keys_and_does_not_start_without_accounts(
        tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from health_mlops.trust.access import ACCOUNTS_FILE_NAME, issue_key, set_user
    from tests.conftest import free_port_range, wait_until_ready

    port = free_port_range(1)
    env = {**os.environ, "HEALTH_MLOPS_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "health_mlops.cli", "dashboard", "--port", str(port)]
    # No accounts file: there is no open mode to fall back to.
    accounts = tmp_path / "credentials" / ACCOUNTS_FILE_NAME
    missing = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and str(accounts) in missing.stderr and "dashboard-account add" in missing.stderr
    set_user(accounts, "ada", "admin", "a long enough passphrase")
    key = issue_key(accounts, "lab-system", "clinician")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/readyz", process, timeout_s=60)
        model = f"http://127.0.0.1:{port}/api/v1/model"
        assert httpx.get(model).status_code == 401
        assert httpx.get(model, headers={"X-API-Key": key[:-1]}).status_code == 401
        assert httpx.get(model, headers={"X-API-Key": key}).json()["spec"]["name"] == "health-risk"
        assert httpx.get(model, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200  # probes need no key
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert (page.status_code, page.headers["location"]) == (303, "/login")  # the dashboard asks who first
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'health_mlops_auth_failures_total{status="401"} 2.0' in metrics
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_dashboard_serves_https_with_its_provisioned_certificate(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from health_mlops.trust.access import ACCOUNTS_FILE_NAME, set_user
    from health_mlops.trust.credentials import provision
    from health_mlops.trust.pki import CA, DASHBOARD, cert_path, key_path
    from tests.conftest import free_port_range

    credentials = tmp_path / "credentials"
    provision(credentials, [])
    set_user(credentials / ACCOUNTS_FILE_NAME, "ada", "admin", "a long enough passphrase")
    port = free_port_range(1)
    env = {**os.environ, "HEALTH_MLOPS_HOME": str(tmp_path),
           "HEALTH_MLOPS_DASHBOARD_TLS_CERT": str(cert_path(credentials, DASHBOARD)),
           "HEALTH_MLOPS_DASHBOARD_TLS_KEY": str(key_path(credentials, DASHBOARD))}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "health_mlops.cli", "dashboard", "--port", str(port)]
    without_key = {k: v for k, v in env.items() if k != "HEALTH_MLOPS_DASHBOARD_TLS_KEY"}
    half = subprocess.run(command, env=without_key, capture_output=True, text=True, timeout=120)
    assert half.returncode == 2 and "go together" in half.stderr
    consortium_ca = ssl.create_default_context(cafile=str(cert_path(credentials, CA)))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:  # ready over HTTPS, the certificate verified against the consortium CA
            try:
                if httpx.get(f"https://localhost:{port}/readyz", verify=consortium_ca).is_success:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stderr
            time.sleep(0.2)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/readyz")  # no plain HTTP beside it
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_readiness_says_when_the_registry_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    watcher = ChampionWatcher(Registry(tmp_path, SPEC.name), poll_s=0.05)
    with BackgroundServer(create_serving_app(SPEC, watcher)) as server:
        assert httpx.get(f"{server.url}/readyz").status_code == 200  # no champion yet is a normal state

        def unreachable() -> None:
            raise ConnectionError("registry database is gone")

        monkeypatch.setattr(watcher.registry, "champion", unreachable)
        deadline = time.monotonic() + 10
        while (response := httpx.get(f"{server.url}/readyz")).status_code == 200:
            assert time.monotonic() < deadline, "readiness never noticed the registry failing"
            time.sleep(0.05)
        assert response.status_code == 503 and "registry database is gone" in response.text
        monkeypatch.undo()
        while httpx.get(f"{server.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline + 10, "readiness never recovered"
            time.sleep(0.05)


def test_a_champion_written_straight_into_mlflow_is_not_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               empty_mlflow_db: Path, patients: list[dict]) -> None:
    """MLflow is not a back door: the champion alias set with MLflow's own API (no audit line, no attestation)
    leaves the dashboard serving the champion it had; the same version promoted through the registry is served."""
    import time

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with_empty_mlflow_db(tmp_path, empty_mlflow_db)
    audit = AuditLog(tmp_path / "audit.log", bytes(range(32)))
    registry = Registry(tmp_path, SPEC.name, audit=audit)
    watcher = ChampionWatcher(Registry(tmp_path, SPEC.name, audit=audit), poll_s=0.05)
    with BackgroundServer(create_serving_app(SPEC, watcher)) as server:
        v1 = register(registry, trained(patients, seed=0)[0], "run-a", 0.8)
        wait_for_version(server.url, v1)
        v2 = register(registry, trained(patients, seed=1)[0], "run-b", 0.5)  # worse: a challenger
        registry.client.set_registered_model_alias(SPEC.name, CHAMPION, str(v2))
        deadline = time.monotonic() + 30
        while watcher.refused is None:
            assert time.monotonic() < deadline, "the watcher never looked at the new alias"
            time.sleep(0.05)
        assert f"not serving v{v2}: it was never promoted through the registry" in watcher.refused
        assert httpx.get(f"{server.url}/api/v1/model").json()["version"] == v1
        registry.promote(v2, actor="admin")
        wait_for_version(server.url, v2)
        assert watcher.refused is None


def test_inputs_beyond_what_the_model_saw_are_named_in_every_answer(serving: tuple[str, Registry],
                                                                   patients: list[dict]) -> None:
    url, registry = serving
    wait_for_version(url, register(registry, trained(patients, seed=0)[0], "run-a", 0.8))
    typical = httpx.post(f"{url}/api/v1/predict", json=patients[0]).json()
    assert typical["outside_training_range"] == []
    hypoxic = httpx.post(f"{url}/api/v1/predict", json={**patients[0], "spo2": 70}).json()
    (flag,) = hypoxic["outside_training_range"]
    assert flag["feature"] == "spo2" and flag["value"] == 70 and 70 < flag["seen"][0] < flag["seen"][1] <= 100
    lower = httpx.post(f"{url}/api/v1/predict", json={**patients[0], "spo2": 75}).json()
    assert lower["prediction"] == hypoxic["prediction"]  # scored at the range's edge: flat, not extrapolated
    batch = httpx.post(f"{url}/api/v1/predict/batch", json={"rows": [patients[0], {**patients[0], "spo2": 70}]})
    assert [len(flags) for flags in batch.json()["outside_training_range"]] == [0, 1]


def test_a_hospital_asks_for_its_own_recalibrated_risk_and_an_unknown_one_is_refused_naming_the_field(
        serving: tuple[str, Registry], patients: list[dict]) -> None:
    url, registry = serving
    sites = {"hospital-2": SiteCalibration(intercept=1.5, slope=0.8, rows=200, events=40, threshold=0.3)}
    wait_for_version(url, register(registry, trained(patients, seed=0, sites=sites)[0], "run-a", 0.8))
    plain = httpx.post(f"{url}/api/v1/predict", json=patients[0]).json()
    local = httpx.post(f"{url}/api/v1/predict", params={"hospital": "hospital-2"}, json=patients[0]).json()
    risk = plain["prediction"]
    expected = 1 / (1 + math.exp(-(1.5 + 0.8 * math.log(risk / (1 - risk)))))
    assert local["prediction"] == pytest.approx(expected, rel=1e-5) and local["prediction"] != risk
    assert local["hospital"] == "hospital-2" and local["threshold"] == 0.3
    assert local["class"] == int(local["prediction"] >= 0.3) and "hospital" not in plain
    batch = httpx.post(f"{url}/api/v1/predict/batch", params={"hospital": "hospital-2"},
                       json={"rows": patients[:3]}).json()
    assert batch["predictions"][0] == pytest.approx(local["prediction"], rel=1e-6) and batch["threshold"] == 0.3
    assert batch["classes"] == [int(p >= 0.3) for p in batch["predictions"]]
    for route, body in (("predict", patients[0]), ("predict/batch", {"rows": patients[:2]})):
        refused = httpx.post(f"{url}/api/v1/{route}", params={"hospital": "hospital-9"}, json=body)
        assert refused.status_code == 422, refused.text
        (error,) = refused.json()["detail"]
        assert error["loc"] == ["query", "hospital"] and "hospital-2" in error["msg"]
    assert httpx.get(f"{url}/api/v1/model").json()["site_calibrations"] == ["hospital-2"]
