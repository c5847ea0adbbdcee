"""Command-line tools around the Flower apps: simulation runs, deployments, Docker."""
