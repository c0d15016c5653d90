"""The client side of routerd: what `routerd pull|list|ps|show|rm|cp|run|stop` send to a
daemon (api.py) and how pull progress is drawn on a terminal (progress.py)."""
