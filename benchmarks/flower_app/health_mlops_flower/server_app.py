"""The ServerApp: health-mlops' run (round 0 statistics, R FedAvg fit rounds, a final evaluation) on Flower.

The fit rounds are Flower's own `FedAvg` (`strategy.start`), wrapped only to time each round: from the start of
`configure_train` to the end of `aggregate_train`, as health-mlops' aggregator times a round from its opening to
its closing. Round 0 and the final evaluation are one `send_and_receive` each. Every round's times and the
hospitals' reported timings are written to the run config's `timings-file` (JSON) for the driver.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from health_mlops.config import get_settings
from health_mlops.fl.stats import reduce_stats
from health_mlops.fl.metadata import StatsMetadata
from health_mlops.ml.initial_weights import initial_weights
from health_mlops.spec import load_spec

from health_mlops_flower.task import now

SPEC = "health-risk"
app = ServerApp()


def _hospital_timings(record: MetricRecord) -> dict[str, float]:
    return {key.replace("-", "_"): float(record[key])  # type: ignore[arg-type]
            for key in ("compute-seconds", "load-seconds", "startup-seconds")}


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, with each training round timed."""

    def __init__(self, rounds: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds = rounds
        self.opened: dict[int, float] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.opened[server_round] = now()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [m.error.reason for m in replies if m.has_error()]
        if failed or len(replies) < self.min_train_nodes:
            raise RuntimeError(f"round {server_round}: {len(replies)} replies, errors {failed}")
        aggregated = super().aggregate_train(server_round, replies)
        self.rounds.append({"round": server_round, "kind": "fit", "opened": self.opened[server_round],
                            "closed": now(),
                            "hospitals": {str(m.content["info"]["hospital"]): _hospital_timings(m.content["metrics"])
                                          for m in replies}})
        return aggregated


def _send_to_all(grid: Grid, node_ids: list[int], content: RecordDict, message_type: str,
                 timeout: float) -> list[Message]:
    replies = list(grid.send_and_receive([Message(content, dst_node_id=node, message_type=message_type)
                                          for node in node_ids], timeout=timeout))
    failed = [m.error.reason for m in replies if m.has_error()]
    if failed or len(replies) != len(node_ids):
        raise RuntimeError(f"{message_type}: {len(replies)} of {len(node_ids)} replies, errors {failed}")
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.set_num_threads(get_settings().torch_threads)
    spec = load_spec(SPEC)
    nodes, rounds_total = int(cfg["min-nodes"]), int(cfg["num-server-rounds"])
    timeout = 600.0
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:  # the SuperNodes have registered; before the clock
        time.sleep(0.1)
    rounds: list[dict[str, Any]] = []
    settings = {"rounds": rounds_total, "local-epochs": int(cfg["local-epochs"]),
                "learning-rate": float(cfg["learning-rate"]), "batch-size": int(cfg["batch-size"]),
                "weight-decay": float(cfg["weight-decay"]), "min-nodes": nodes}

    # Round 0: statistics, reduced by health-mlops' own function into the global standardisation.
    opened = now()
    replies = _send_to_all(grid, node_ids, RecordDict({"config": ConfigRecord({"kind": "stats"})}),
                           MessageType.QUERY, timeout)
    preprocessing = reduce_stats(spec, [StatsMetadata.model_validate_json(str(m.content["stats"]["json"]))
                                        for m in replies]).model_dump_json()
    rounds.append({"round": 0, "kind": "stats", "opened": opened, "closed": now(),
                   "hospitals": {str(m.content["stats"]["hospital"]): _hospital_timings(m.content["timings"])
                                 for m in replies}})

    # Rounds 1..R: Flower's FedAvg, every node every round, no federated evaluation between rounds (each fit
    # scores the incoming model first, as health-mlops' fit task does).
    strategy = TimedFedAvg(rounds, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                           min_available_nodes=nodes)
    start = {name: Array(np.asarray(value, dtype=np.float32))
             for name, value in initial_weights(spec, int(cfg["seed"])).items()}
    train_config = ConfigRecord({**settings, "preprocessing": preprocessing})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(start), num_rounds=rounds_total,
                            timeout=timeout, train_config=train_config)

    # The final evaluation of the final global model.
    opened = now()
    final = ConfigRecord({**settings, "preprocessing": preprocessing, "server-round": rounds_total + 1})
    replies = _send_to_all(grid, node_ids, RecordDict({"arrays": result.arrays, "config": final}),
                           MessageType.EVALUATE, timeout)
    evaluation = {str(m.content["evaluation"]["hospital"]): json.loads(str(m.content["evaluation"]["json"]))
                  for m in replies}
    rounds.append({"round": rounds_total + 1, "kind": "evaluate", "opened": opened, "closed": now(),
                   "hospitals": {str(m.content["evaluation"]["hospital"]): _hospital_timings(m.content["timings"])
                                 for m in replies}})

    if target := str(cfg["timings-file"]):
        path = Path(target)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"rounds": rounds, "evaluation": evaluation, "pid": os.getpid()}),
                             encoding="utf-8")
        temporary.rename(path)
