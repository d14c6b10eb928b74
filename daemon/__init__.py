"""offload: a durable background-task daemon."""

__version__ = "0.1.0"
