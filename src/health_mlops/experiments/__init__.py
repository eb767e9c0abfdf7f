"""Experiment harnesses: ways of training run side by side to judge a federation, never imported by a service.

`baselines` (pooled and local-only training), `simulation` (a federation in one process, with the services'
coordinator and hospital code), `loopback` (the real aggregator and nodes over loopback HTTP, in one process)
and `seeds` (the README's claims, over several seeds). The CLI's `train`, `evaluate` and `demo`, the benchmarks
and the tests use them.
"""
