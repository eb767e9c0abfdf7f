"""Who may do what: the consortium's certificates and TLS contexts, the aggregator's credentials, the dashboard's
accounts, MLflow's users and the hash-chained audit log."""
