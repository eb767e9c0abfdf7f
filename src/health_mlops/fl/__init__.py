"""Federation: strategies, the coordinator core, the aggregator service and the hospital node."""
