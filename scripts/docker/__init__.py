"""The Docker compose deployment (`compose_demo.py`)."""
