"""routerd's own engine worker: llama-server's HTTP API over llama-cpp-python.

Run as `python -m routerd.engine --model PATH --port N [...]` (see `options.py`); routerd
spawns it for models with `backend: llama-cpp-python`. Importing this package does not
import llama_cpp; only loading a model does.
"""
