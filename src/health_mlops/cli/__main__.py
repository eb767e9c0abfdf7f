"""`python -m health_mlops.cli`, as the demo starts its processes."""

from health_mlops.cli import main

main()
