"""Export a trained model to ONNX with its preprocessing inside, so serving needs neither torch nor the stats.

The graph's input `features` is a float32 matrix with one column per spec feature, in spec order: numeric
features as their value, categorical features as the index of their category in the spec, NaN for a value the
spec allows to be missing. Inside, the graph fills missing values in (the run's federated mean or most common
category) and adds the spec's missingness indicators, clamps each numeric input to the range the training rows
covered (`data.preprocess.training_ranges`), one-hot encodes the categories, standardises every column with the
run's global mean and scale, applies the network, and outputs `prediction`: the event probability for binary
tasks, the value in the target's unit for regression. The graph is built directly from the weight arrays (a chain
of Gemm and `ml.model.SplitReLU`'s Relu, Min and Where, as in `ml.model.build_model`), so exporting needs no
tracing and works from the aggregator's numpy weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from health_mlops.data.preprocess import (GlobalPreprocessing, NumericPart, numeric_parts, serving_fill,
                                          training_ranges)
from health_mlops.ml.directions import convex_units
from health_mlops.ml.site_calibration import SiteCalibration
from health_mlops.spec import DatasetSpec

INPUT_NAME = "features"
OUTPUT_NAME = "prediction"
OPSET = 17
HISTOGRAMS_KEY = "health_mlops.histograms"  # metadata: feature -> row counts on the spec's histogram grid
THRESHOLD_KEY = "health_mlops.decision_threshold"  # metadata (binary tasks): the risk at which a patient is flagged
RANGES_KEY = "health_mlops.training_ranges"  # metadata: numeric feature -> [low, high] the training rows covered
SITES_KEY = "health_mlops.site_calibrations"  # metadata: hospital -> its recalibration and threshold
_UNBOUNDED = float(np.finfo(np.float32).max)
_LAYER = re.compile(r"^(\d+)\.(weight|bias)$")


def _layers(weights: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each Linear layer of the Sequential model, in order."""
    indices: dict[int, dict[str, np.ndarray]] = {}
    for name, value in weights.items():
        match = _LAYER.match(name)
        if match is None:
            raise ValueError(f"unexpected tensor {name!r}: expected a Sequential of Linear layers")
        indices.setdefault(int(match.group(1)), {})[match.group(2)] = np.asarray(value, dtype=np.float32)
    layers = []
    for index in sorted(indices):
        parts = indices[index]
        if set(parts) != {"weight", "bias"}:
            raise ValueError(f"layer {index} lacks its weight or bias")
        layers.append((parts["weight"], parts["bias"]))
    return layers


def export_onnx(spec: DatasetSpec, preprocessing: GlobalPreprocessing, weights: Mapping[str, np.ndarray], *,
                sites: Mapping[str, SiteCalibration] | None = None) -> bytes:
    """The serialized ONNX model of `weights` with the run's `preprocessing` inside (imputation, standardisation,
    the target's scale), its training histograms and decision threshold as metadata, and with `sites`, each
    hospital's recalibration (its threshold: its own event rate)."""
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    # One Gather spreads the input over the encoded columns (a categorical feature's index repeated once per
    # category); Equal against each column's category code makes the one-hot columns, and Where keeps numeric
    # columns as they are. Six nodes whatever the number of features: a single prediction's cost is mostly
    # per node, so this beats a Slice and Concat per feature several times over.
    source = INPUT_NAME
    if any(f.missing is not None for f in spec.features):  # NaN is "not measured": fill it, flag it
        fill = serving_fill(spec, np.asarray(preprocessing.fill, dtype=np.float64))
        nodes += [helper.make_node("IsNaN", [INPUT_NAME], ["is_missing"]),
                  helper.make_node("Where", ["is_missing", constant("fill", np.array(fill, dtype=np.float32)),
                                             INPUT_NAME], ["filled"])]
        source = "filled"
    # Inputs beyond what the training rows covered are clamped to its edge: the risk is flat out there, not an
    # extrapolation of the network (serving flags them: `outside_training_range`).
    ranges = training_ranges(spec, preprocessing.histograms)
    if ranges:
        lows = [ranges[f.name][0] if f.name in ranges else -_UNBOUNDED for f in spec.features]
        highs = [ranges[f.name][1] if f.name in ranges else _UNBOUNDED for f in spec.features]
        nodes += [helper.make_node("Min", [source, constant("seen_high", np.array(highs, dtype=np.float32))],
                                   ["below_high"]),
                  helper.make_node("Max", ["below_high", constant("seen_low", np.array(lows, dtype=np.float32))],
                                   ["clamped"])]
        source = "clamped"
    sources: list[int] = []
    codes: list[float] = []
    is_numeric: list[bool] = []
    parts: list[NumericPart] = []  # each column's clip(x + shift, low, high); identity for categories
    for j, feature in enumerate(spec.features):
        shapes = ([shape for _, shape in numeric_parts(feature)] if feature.type == "numeric"
                  else [(0.0, -np.inf, np.inf)] * len(feature.categories or ()))
        for code, shape in enumerate(shapes):
            sources.append(j)
            codes.append(float(code))
            is_numeric.append(feature.type == "numeric")
            parts.append(shape)
    nodes += [
        helper.make_node("Gather", [source, constant("sources", np.array(sources, dtype=np.int64))],
                         ["spread"], axis=1),
        helper.make_node("Equal", ["spread", constant("codes", np.array(codes, dtype=np.float32))], ["is_code"]),
        helper.make_node("Cast", ["is_code"], ["one_hot"], to=TensorProto.FLOAT),
    ]
    numeric = "spread"
    if any(f.direction_from is not None for f in spec.features):  # a direction from a value on: split the value
        shift, low, high = (np.clip(np.array(column, dtype=np.float64), -_UNBOUNDED, _UNBOUNDED).astype(np.float32)
                            for column in zip(*parts, strict=True))
        nodes += [helper.make_node("Add", ["spread", constant("part_shift", shift)], ["shifted"]),
                  helper.make_node("Min", ["shifted", constant("part_high", high)], ["part_below_high"]),
                  helper.make_node("Max", ["part_below_high", constant("part_low", low)], ["parts"])]
        numeric = "parts"
    nodes.append(helper.make_node("Where", [constant("is_numeric", np.array(is_numeric)), numeric, "one_hot"],
                                  ["encoded"]))
    encoded = "encoded"
    indicators = [j for j, f in enumerate(spec.features) if f.has_indicator]
    if indicators:  # after every feature's columns, as `encoded_columns` orders them
        nodes += [helper.make_node("Cast", ["is_missing"], ["missing_flags"], to=TensorProto.FLOAT),
                  helper.make_node("Gather", ["missing_flags", constant("indicator_sources",
                                                                        np.array(indicators, dtype=np.int64))],
                                   ["indicators"], axis=1),
                  helper.make_node("Concat", ["encoded", "indicators"], ["encoded_all"], axis=1)]
        encoded = "encoded_all"
    nodes.append(helper.make_node("Sub", [encoded, constant("mean", np.asarray(preprocessing.mean,
                                                                               dtype=np.float32))], ["centred"]))
    nodes.append(helper.make_node("Div", ["centred", constant("scale", np.asarray(preprocessing.scale,
                                                                                dtype=np.float32))], ["x0"]))
    layers = _layers(weights)
    current = "x0"
    for i, (weight, bias) in enumerate(layers):
        output = f"linear_{i}"
        nodes.append(helper.make_node("Gemm", [current, constant(f"w_{i}", weight), constant(f"b_{i}", bias)],
                                      [output], transB=1))
        current = output
        if i < len(layers) - 1:  # `ml.model.SplitReLU`: ReLU on the first units, min(x, 0) on the others
            convex = np.arange(len(bias)) < convex_units(len(bias))
            nodes += [helper.make_node("Relu", [current], [f"relu_{i}"]),
                      helper.make_node("Min", [current, constant(f"zero_{i}", np.zeros(1, dtype=np.float32))],
                                       [f"below_{i}"]),
                      helper.make_node("Where", [constant(f"convex_{i}", convex), f"relu_{i}", f"below_{i}"],
                                       [f"hidden_{i}"])]
            current = f"hidden_{i}"
    nodes.append(helper.make_node("Squeeze", [current, constant("squeeze_axis", np.array([1]))], ["raw"]))
    if spec.task == "binary":
        nodes.append(helper.make_node("Sigmoid", ["raw"], [OUTPUT_NAME]))
    else:
        target_scale = np.array(preprocessing.target_scale, dtype=np.float32)
        target_mean = np.array(preprocessing.target_mean, dtype=np.float32)
        nodes.append(helper.make_node("Mul", ["raw", constant("target_scale", target_scale)], ["scaled"]))
        nodes.append(helper.make_node("Add", ["scaled", constant("target_mean", target_mean)], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes, f"{spec.name}-model",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["rows", len(spec.features)])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["rows"])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="health-mlops")
    model.doc_string = f"{spec.name}: input columns {[f.name for f in spec.features]}"
    if preprocessing.histograms:  # the training population's distribution, for drift detection
        entry = model.metadata_props.add()
        entry.key, entry.value = HISTOGRAMS_KEY, json.dumps(preprocessing.histograms)
    if ranges:
        entry = model.metadata_props.add()
        entry.key, entry.value = RANGES_KEY, json.dumps(ranges)
    if spec.task == "binary" and preprocessing.threshold is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = THRESHOLD_KEY, repr(float(preprocessing.threshold))
    if sites:
        entry = model.metadata_props.add()
        entry.key, entry.value = SITES_KEY, json.dumps({h: c.to_json() for h, c in sites.items()})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _metadata(onnx_model: bytes) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_from_string(onnx_model).metadata_props}


def stored_training_ranges(onnx_model: bytes) -> dict[str, tuple[float, float]]:
    """The training ranges stored with an exported model (empty: exported before they were, or no histograms)."""
    metadata = _metadata(onnx_model)
    return {name: (float(low), float(high)) for name, (low, high) in json.loads(metadata.get(RANGES_KEY, "{}")).items()}


def stored_site_calibrations(onnx_model: bytes) -> dict[str, SiteCalibration]:
    """Each hospital's recalibration stored with an exported model (empty: none was fitted)."""
    metadata = _metadata(onnx_model)
    return {h: SiteCalibration.from_json(c) for h, c in json.loads(metadata.get(SITES_KEY, "{}")).items()}


def decision_threshold(onnx_model: bytes) -> float | None:
    """The decision threshold stored with an exported binary model (None: exported before thresholds were)."""
    metadata = _metadata(onnx_model)
    return float(metadata[THRESHOLD_KEY]) if THRESHOLD_KEY in metadata else None


@dataclass(frozen=True)
class FeatureReference:
    """What the training data looked like, per spec feature, read back from an exported model's constants.

    `mean` and `scale` (numeric features) and `frequencies` (categorical: each category's share) are the
    run's global preprocessing statistics, and `histograms` the rows per bin of the spec's grid summed over
    hospitals (models exported before histograms were collected have none), so serving can tell typical
    values and drift without the data.
    """

    mean: dict[str, float]
    scale: dict[str, float]
    frequencies: dict[str, list[float]]
    histograms: dict[str, list[int]]

    def typical_row(self, spec: DatasetSpec) -> list[float]:
        """The model input of a typical patient: numeric features at their mean, categories at their mode."""
        return [self.mean[f.name] if f.type == "numeric" else float(np.argmax(self.frequencies[f.name]))
                for f in spec.features]


def feature_reference(spec: DatasetSpec, onnx_model: bytes) -> FeatureReference:
    """The `FeatureReference` of a model exported by `export_onnx` for `spec` (the inverse of its layout)."""
    model = onnx.load_from_string(onnx_model)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    metadata = {p.key: p.value for p in model.metadata_props}
    mean, scale = constants["mean"].astype(np.float64), constants["scale"].astype(np.float64)
    means: dict[str, float] = {}
    scales: dict[str, float] = {}
    frequencies: dict[str, list[float]] = {}
    column = 0
    for feature in spec.features:
        if feature.type == "numeric":
            means[feature.name], scales[feature.name] = float(mean[column]), float(scale[column])
            column += 1
        else:
            width = len(feature.categories or ())
            frequencies[feature.name] = [float(v) for v in mean[column:column + width]]
            column += width
    column += sum(f.has_indicator for f in spec.features)
    if column != len(mean):
        raise ValueError(f"the model has {len(mean)} encoded columns; spec {spec.name} describes {column}")
    histograms = json.loads(metadata.get(HISTOGRAMS_KEY, "{}"))
    return FeatureReference(means, scales, frequencies, {f.name: histograms[f.name] for f in spec.features
                                                         if f.name in histograms})
