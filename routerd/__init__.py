"""routerd: many local LLMs behind one endpoint."""

__version__ = "0.1.0"
