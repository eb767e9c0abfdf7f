"""The model being served, and the watcher that swaps in a new champion without a request noticing.

A request takes `watcher.current` once and uses that object to the end, and a swap replaces the reference in
one assignment, so no request can see a half-loaded model.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime

from health_mlops.ml.onnx import (INPUT_NAME, OUTPUT_NAME, FeatureReference, decision_threshold, feature_reference,
                                  stored_site_calibrations, stored_training_ranges)
from health_mlops.ml.site_calibration import SiteCalibration
from health_mlops.registry import Registry
from health_mlops.serving.drift import InputDrift
from health_mlops.spec import DatasetSpec, load_spec_text

log = logging.getLogger("health_mlops.serving")


@dataclass(frozen=True)
class ServedModel:
    version: int
    metric_name: str
    metric: float
    federation_run: str
    spec: DatasetSpec
    session: onnxruntime.InferenceSession
    reference: FeatureReference  # the training population, for explanations and drift
    typical: list[float]  # the model input of a typical patient of that population
    drift: InputDrift  # the rows this model has scored, against its own training population
    threshold: float | None  # binary tasks: the risk at or above which a patient is flagged (class 1)
    ranges: dict[str, tuple[float, float]]  # numeric feature -> the range its training rows covered
    bounds: tuple[np.ndarray, np.ndarray]  # those ranges per input column (lows, highs; infinite where none)
    sites: dict[str, SiteCalibration]  # hospital -> its recalibration of this model (binary tasks)

    def at_site(self, predictions: np.ndarray, hospital: str) -> np.ndarray:
        """The risks as `hospital` recalibrated them (`KeyError`: no calibration by it)."""
        return self.sites[hospital].apply(predictions).astype(np.float32)

    def threshold_for(self, hospital: str | None) -> float | None:
        """The decision threshold of the model's risks, or of `hospital`'s recalibrated ones (its own)."""
        return self.threshold if hospital is None else self.sites[hospital].threshold

    def outside_training_range(self, matrix: np.ndarray) -> list[list[dict[str, Any]]]:
        """Per row, each input beyond what the training rows covered (the model scored it at the range's edge):
        `{feature, value, seen: [low, high]}`; an empty list for a row inside it."""
        lows, highs = self.bounds
        outside = (matrix < lows) | (matrix > highs)  # NaN (not measured) is neither
        flagged: list[list[dict[str, Any]]] = [[] for _ in range(len(matrix))]
        names = [f.name for f in self.spec.features]
        for row, column in zip(*np.nonzero(outside), strict=True):
            flagged[row].append({"feature": names[column], "value": float(matrix[row, column]),
                                 "seen": [float(lows[column]), float(highs[column])]})
        return flagged

    @classmethod
    def load(cls, onnx_model: bytes, spec_yaml: str, *, version: int, metric_name: str, metric: float,
             federation_run: str) -> ServedModel:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # requests run in parallel; one thread each is fastest for small models
        session = onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        spec = load_spec_text(spec_yaml)
        reference = feature_reference(spec, onnx_model)
        ranges = stored_training_ranges(onnx_model)
        bounds = (np.array([ranges.get(f.name, (-np.inf, np.inf))[0] for f in spec.features]),
                  np.array([ranges.get(f.name, (-np.inf, np.inf))[1] for f in spec.features]))
        return cls(version, metric_name, metric, federation_run, spec, session, reference,
                   reference.typical_row(spec), InputDrift(spec, reference), decision_threshold(onnx_model),
                   ranges, bounds, stored_site_calibrations(onnx_model))

    def predict(self, features: np.ndarray) -> np.ndarray:
        (prediction,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: features})
        return prediction

    def classes(self, predictions: np.ndarray, threshold: float | None = None) -> list[int] | None:
        """Each prediction as a decision: 1 at or above `threshold`, else the model's (None without one)."""
        threshold = self.threshold if threshold is None else threshold
        return None if threshold is None else (predictions >= threshold).astype(int).tolist()

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "metrics": {self.metric_name: self.metric},
                "federation_run": self.federation_run, "decision_threshold": self.threshold,
                "site_calibrations": sorted(self.sites)}


class ChampionWatcher:
    """Polls the registry for the champion and loads a new one in the background."""

    def __init__(self, registry: Registry, poll_s: float) -> None:
        self.registry = registry
        self.poll_s = poll_s
        self.current: ServedModel | None = None
        self.last_error: str | None = None
        self.refused: str | None = None  # why the registry's champion is not served, if it is not
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="champion-watcher", daemon=True)

    def refresh(self) -> None:
        """Load the champion if it changed (also called once before serving starts)."""
        champion = self.registry.champion()
        if champion is None or (self.current is not None and self.current.version == champion.version):
            return
        refusal = self.registry.champion_refusal(champion.version)
        if refusal is not None:  # the alias was set outside the audited path: keep serving what was audited
            refused = f"not serving v{champion.version}: {refusal}"
            if refused != self.refused:
                log.error("%s; still serving %s", refused, f"v{self.current.version}" if self.current else "nothing")
            self.refused = refused
            return
        self.refused = None
        onnx_model, spec_yaml = self.registry.load_artifacts(champion.version)
        loaded = ServedModel.load(onnx_model, spec_yaml, version=champion.version, metric_name=champion.metric_name,
                                  metric=champion.metric, federation_run=champion.federation_run)
        self.current = loaded  # the swap: one reference assignment
        log.info("serving %s v%d", self.registry.model_name, loaded.version)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
                self.last_error = None
            except Exception as error:  # the registry may be briefly away; keep serving the current model
                self.last_error = f"{type(error).__name__}: {error}"
                log.warning("cannot refresh the champion: %s", self.last_error)

    def problem(self) -> str | None:
        """Why this watcher cannot follow the registry, if it cannot."""
        if self._thread.ident is not None and not self._thread.is_alive():
            return "the champion watcher stopped"
        return f"cannot read the registry: {self.last_error}" if self.last_error else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
