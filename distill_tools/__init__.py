"""Tools that run on the user's own machine with their own torch (never in the API or the worker process)."""
