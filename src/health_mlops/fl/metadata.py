"""What a hospital may say about its result, checked before the coordinator stores anything.

A result's metadata feeds the aggregation (example counts weigh updates), the global preprocessing (stats)
and the metrics the aggregator exports, so a malformed or hostile value must be refused at the door with a
reason, never reach the arithmetic. What passes is kept as the typed model it was checked against: the
coordinator, the run's records and the model report read its fields, not a dict's keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from health_mlops.data.preprocess import HISTOGRAM_BINS
from health_mlops.fl.errors import Rejected
from health_mlops.metrics import BINARY_METRICS, CALIBRATION_BINS, REGRESSION_METRICS, SCORE_BINS

# The metric names hospitals may report (those of `metrics`); anything else would become new time series.
METRIC_NAMES = frozenset({*BINARY_METRICS, *REGRESSION_METRICS})
MAX_ROWS = 10**9  # far beyond any hospital; keeps example weights and sums finite

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_ROWS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StatsMetadata(_Strict):
    count: Count
    observed: list[Count | None] | None = None  # per column: rows not missing (None: suppressed; absent: all)
    sums: list[FiniteFloat | None]  # None: a suppressed small cell
    sums_of_squares: list[FiniteFloat | None]
    target_sum: FiniteFloat
    target_sum_of_squares: FiniteFloat
    rows_quarantined: Count = 0  # data quality: rows the hospital's validation set aside
    # feature -> rows per bin of the spec's grid (None: a suppressed small cell)
    histograms: dict[Annotated[str, Field(max_length=200)],
                     Annotated[list[Count | None], Field(min_length=HISTOGRAM_BINS, max_length=HISTOGRAM_BINS)]] = (
        Field(default_factory=dict, max_length=1000))
    compute_seconds: FiniteFloat = 0.0


class SiteCalibrationMetadata(_Strict):
    """A hospital's recalibration of the final model (`ml.site_calibration`), fitted on its validation rows."""

    intercept: Annotated[float, Field(ge=-50, le=50, allow_inf_nan=False)]
    slope: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]
    rows: Count
    events: Count


class LocalComparisonMetadata(_Strict):
    """On a hospital's validation rows: the log loss of the final model as it recalibrated it, and of its own
    logistic regression trained on its training rows alone."""

    federated_loss: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    local_loss: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class SummaryMetadata(_Strict):
    """A binary model's counts and sums on a hospital's test rows (`metrics.BinarySummary`)."""

    threshold: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    confusion: Annotated[list[Count], Field(min_length=4, max_length=4)]
    squared_error_sum: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    log_loss_sum: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    calibration_count: Annotated[list[Count], Field(min_length=CALIBRATION_BINS, max_length=CALIBRATION_BINS)]
    calibration_predicted: Annotated[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]],
                                     Field(min_length=CALIBRATION_BINS, max_length=CALIBRATION_BINS)]
    calibration_observed: Annotated[list[Count], Field(min_length=CALIBRATION_BINS, max_length=CALIBRATION_BINS)]
    score_positive: Annotated[list[Count], Field(min_length=SCORE_BINS, max_length=SCORE_BINS)]
    score_negative: Annotated[list[Count], Field(min_length=SCORE_BINS, max_length=SCORE_BINS)]


class EvaluationMetadata(_Strict):
    num_examples: Annotated[int, Field(strict=True, gt=0, le=MAX_ROWS)]
    num_test_examples: Count
    metrics: dict[str, FiniteFloat | None] = Field(max_length=len(METRIC_NAMES))  # None: undefined (one class)
    summary: SummaryMetadata | None = None  # the final model's evaluation of a binary task
    # The model's summed loss on the hospital's validation rows (none held out: 0 rows): the federation's best
    # round is the one whose model has the least loss over all hospitals' validation rows.
    validation_loss_sum: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    validation_rows: Count = 0
    # The final model recalibrated at the hospital, and its metrics on the test rows with that calibration
    site_calibration: SiteCalibrationMetadata | None = None
    local_comparison: LocalComparisonMetadata | None = None
    calibrated_metrics: dict[str, FiniteFloat | None] | None = Field(None, max_length=len(METRIC_NAMES))
    compute_seconds: FiniteFloat = 0.0


class FitMetadata(EvaluationMetadata):
    train_loss: FiniteFloat | None = None
    dp_steps: Count | None = None  # DP-SGD steps taken this round (what it spent of the privacy budget)


# A fit result is an evaluation of the incoming model plus training's own numbers.
ResultMetadata = StatsMetadata | FitMetadata | EvaluationMetadata
_MODELS: dict[str, type[ResultMetadata]] = {"stats": StatsMetadata, "fit": FitMetadata,
                                            "evaluate": EvaluationMetadata}


def check_metadata(kind: str, metadata: Mapping[str, Any], *, columns: int | None) -> ResultMetadata:
    """`metadata` as the model of a `kind` result; raises `Rejected("bad_metadata", ...)` naming the field unless
    it fits.

    `columns`: how many encoded columns stats must describe (None: not checked).
    """
    try:
        parsed = _MODELS[kind].model_validate(metadata)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "metadata"
        raise Rejected("bad_metadata", f"{field}: {first['msg']}") from None
    if isinstance(parsed, StatsMetadata):
        lengths = {len(parsed.sums), len(parsed.sums_of_squares)}
        if columns is not None and lengths != {columns}:
            raise Rejected("bad_metadata", f"sums: expected {columns} columns, got {sorted(lengths)}")
        if len(lengths) != 1:
            raise Rejected("bad_metadata", "sums and sums_of_squares differ in length")
        if parsed.observed is not None:
            if len(parsed.observed) != len(parsed.sums):
                raise Rejected("bad_metadata", "observed and sums differ in length")
            if any(o is not None and o > parsed.count for o in parsed.observed):
                raise Rejected("bad_metadata", "observed: more observed rows than the count")
    elif isinstance(parsed, EvaluationMetadata):
        unknown = sorted((set(parsed.metrics) | set(parsed.calibrated_metrics or {})) - METRIC_NAMES)
        if unknown:
            raise Rejected("bad_metadata", f"metrics: unknown names {unknown}; allowed {sorted(METRIC_NAMES)}")
        if parsed.summary is not None and sum(parsed.summary.confusion) != parsed.num_test_examples:
            raise Rejected("bad_metadata", "summary: its confusion counts do not add up to num_test_examples")
    return parsed
