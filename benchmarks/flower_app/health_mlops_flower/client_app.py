"""The ClientApp: each message is handled by health-mlops' `HospitalWorker`, as a health-mlops node handles a task.

Flower starts a new `flwr-clientapp` process for every message, so every message first loads the partition
(`load-seconds`) and reports how long ago its process started (`startup-seconds`). `compute-seconds` is the
worker's own `compute_seconds`: for a fit, scoring the incoming global model on the test rows and training,
exactly what health-mlops counts as a hospital's compute.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from health_mlops.config import get_settings
from health_mlops.data.preprocess import GlobalPreprocessing
from health_mlops.fl.state import TaskKind, TaskResult
from health_mlops.fl.run_config import RunConfig

from health_mlops_flower.task import load_worker, now, process_age_seconds, run_config

app = ClientApp()


def _weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _handle(msg: Message, context: Context, kind: TaskKind) -> tuple[str, TaskResult, dict[str, float]]:
    """Load this SuperNode's partition and let its `HospitalWorker` handle the message: the hospital, the result
    and the message's timings."""
    startup, entered = process_age_seconds(), now()
    torch.set_num_threads(get_settings().torch_threads)
    worker = load_worker(str(context.node_config["partition-dir"]))
    loaded = now()
    if kind is TaskKind.stats:
        result = worker.handle(kind, RunConfig(), {}, None, 0)
    else:
        config = msg.content["config"]
        result = worker.handle(kind, run_config(config), _weights(msg.content["arrays"]),
                               GlobalPreprocessing.model_validate_json(str(config["preprocessing"])),
                               int(config["server-round"]))
    timings = {"startup-seconds": startup, "load-seconds": loaded - entered,
               "compute-seconds": result.metadata["compute_seconds"]}
    return worker.hospital_id, result, timings


@app.query()
def stats(msg: Message, context: Context) -> Message:
    """Round 0: the hospital's counts, sums and sums of squares (small cells suppressed)."""
    hospital, result, timings = _handle(msg, context, TaskKind.stats)
    return Message(RecordDict({"stats": ConfigRecord({"json": json.dumps(result.metadata), "hospital": hospital}),
                               "timings": MetricRecord(timings)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A fit round: score the incoming global model on the test rows, train, return the weights."""
    hospital, result, timings = _handle(msg, context, TaskKind.fit)
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(value, dtype=np.float32))  # float32, as health-mlops sends
                          for name, value in result.tensors.items()})
    metrics = {"num-examples": int(result.metadata["num_examples"]), **timings}
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                               "info": ConfigRecord({"hospital": hospital})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The final round: score the final global model on the test rows."""
    hospital, result, timings = _handle(msg, context, TaskKind.evaluate)
    return Message(RecordDict({
        "evaluation": ConfigRecord({"json": json.dumps(result.metadata), "hospital": hospital}),
        "timings": MetricRecord(timings),
    }), reply_to=msg)
