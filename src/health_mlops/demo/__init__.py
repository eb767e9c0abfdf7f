"""`health-mlops demo`: the whole federation on loopback, every component its own process, trained live.

It starts the aggregator and the hospitals' nodes (`federation`), trains one run, compares the federated model
with pooled training, local-only training and the Bayes-optimal score (`comparison`), and serves the champion
with Prometheus scraping every process (`prometheus`). Every process it started is stopped on the way out
(`processes`), Ctrl-C included; their logs stay in `$HEALTH_MLOPS_HOME/logs`.
"""
