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
from health_mlops.fl.coordinator import RunConfig, TaskKind

from health_mlops_flower.task import load_worker, now, process_age_seconds, run_config

app = ClientApp()


def _timings(entered: float, loaded: float, startup: float, compute: float) -> dict[str, float]:
    return {"startup-seconds": startup, "load-seconds": loaded - entered, "compute-seconds": compute}


def _weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


@app.query()
def stats(msg: Message, context: Context) -> Message:
    """Round 0: the hospital's counts, sums and sums of squares (small cells suppressed)."""
    startup, entered = process_age_seconds(), now()
    torch.set_num_threads(get_settings().torch_threads)
    worker = load_worker(str(context.node_config["partition-dir"]))
    loaded = now()
    result = worker.handle(TaskKind.stats, RunConfig(), {}, {}, 0)
    return Message(RecordDict({
        "stats": ConfigRecord({"json": json.dumps(result.metadata), "hospital": worker.hospital_id}),
        "timings": MetricRecord(_timings(entered, loaded, startup, result.metadata["compute_seconds"])),
    }), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A fit round: score the incoming global model on the test rows, train, return the weights."""
    startup, entered = process_age_seconds(), now()
    torch.set_num_threads(get_settings().torch_threads)
    worker = load_worker(str(context.node_config["partition-dir"]))
    loaded = now()
    config = msg.content["config"]
    result = worker.handle(TaskKind.fit, run_config(config), _weights(msg.content["arrays"]),
                           json.loads(str(config["preprocessing"])), int(config["server-round"]))
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(value, dtype=np.float32))  # float32, as health-mlops sends
                          for name, value in result.tensors.items()})
    metrics = {"num-examples": int(result.metadata["num_examples"]),
               **_timings(entered, loaded, startup, result.metadata["compute_seconds"])}
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                               "info": ConfigRecord({"hospital": worker.hospital_id})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The final round: score the final global model on the test rows."""
    startup, entered = process_age_seconds(), now()
    torch.set_num_threads(get_settings().torch_threads)
    worker = load_worker(str(context.node_config["partition-dir"]))
    loaded = now()
    config = msg.content["config"]
    result = worker.handle(TaskKind.evaluate, run_config(config), _weights(msg.content["arrays"]),
                           json.loads(str(config["preprocessing"])), int(config["server-round"]))
    return Message(RecordDict({
        "evaluation": ConfigRecord({"json": json.dumps(result.metadata), "hospital": worker.hospital_id}),
        "timings": MetricRecord(_timings(entered, loaded, startup, result.metadata["compute_seconds"])),
    }), reply_to=msg)
