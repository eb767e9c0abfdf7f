"""Serving: the champion model behind a REST API (and the dashboard). Imports no torch."""
