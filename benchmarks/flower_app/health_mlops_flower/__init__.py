"""health-mlops' federated task as a Flower app (ServerApp and ClientApp), for benchmarks/flower_comparison.py."""
