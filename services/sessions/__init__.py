"""The sessions service."""
