"""A Flower deployment of SuperLink and SuperNodes as separate processes (`deploy.py`)."""
