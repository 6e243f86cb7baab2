"""Integrations with training engines."""
