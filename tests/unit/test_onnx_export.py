"""The exported ONNX model (preprocessing inside) predicts what the torch model predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from health_mlops.data.hospital import load_hospitals
from health_mlops.data.preprocess import GlobalPreprocessing, Preprocessor, serving_matrix, stats_of_frame
from health_mlops.data.synthetic import generate_dataset
from health_mlops.ml.evaluate import predict_frame
from health_mlops.ml.model import build_model, weights_as_numpy
from health_mlops.ml.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx
from health_mlops.ml.train import train_model
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import load_spec


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_onnx_matches_the_torch_model_with_preprocessing_inside(tmp_path: Path, kind: str) -> None:
    spec = load_spec("health-risk")
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"kind": kind})})
    generate_dataset(tmp_path, n_hospitals=1, rows_per_hospital=600, seed=1, split_seed=42, test_fraction=0.2)
    frame = load_hospitals(tmp_path, spec)["hospital-1"].frame
    preprocessor = Preprocessor.from_stats(spec, stats_of_frame(frame, spec))
    model = build_model(spec.model, len(preprocessor.mean), seed=0)
    train_model(model, preprocessor.features(frame), preprocessor.target(frame), spec.task,
                TrainConfig(epochs=2, learning_rate=0.01, batch_size=64))
    preprocessing = GlobalPreprocessing(count=len(frame), mean=preprocessor.mean.tolist(),
                                        scale=preprocessor.scale.tolist())
    body = export_onnx(spec, preprocessing, weights_as_numpy(model))
    session = onnxruntime.InferenceSession(body, providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run([OUTPUT_NAME], {INPUT_NAME: serving_matrix(frame, spec)})
    np.testing.assert_allclose(onnx_out, predict_frame(model, preprocessor, frame), rtol=1e-4, atol=1e-6)
    assert onnx_out.shape == (len(frame),) and ((0 < onnx_out) & (onnx_out < 1)).all()


def test_regression_output_is_in_the_target_unit() -> None:
    spec = load_spec("diabetes")
    n = len(spec.features)
    layers = {"0.weight": np.zeros((1, n + sum(len(f.categories or ()) - 1 for f in spec.features
                                               if f.type == "categorical"))),
              "0.bias": np.array([0.5])}
    width = layers["0.weight"].shape[1]
    preprocessing = GlobalPreprocessing(count=100, mean=[0.0] * width, scale=[1.0] * width, target_mean=150.0,
                                        target_scale=70.0)
    body = export_onnx(spec, preprocessing, layers)
    session = onnxruntime.InferenceSession(body, providers=["CPUExecutionProvider"])
    rows = np.zeros((3, n), dtype=np.float32)
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: rows})
    np.testing.assert_allclose(out, [185.0] * 3)  # 0.5 standard deviations above the mean


def test_weights_that_are_not_a_linear_chain_are_refused() -> None:
    spec = load_spec("health-risk")
    with pytest.raises(ValueError, match="unexpected tensor"):
        export_onnx(spec, GlobalPreprocessing(count=0, mean=[], scale=[]), {"encoder.weight": np.zeros((1, 1))})
