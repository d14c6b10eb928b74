"""Executors run one attempt of a task. One module per kind; `base` holds what they share."""
