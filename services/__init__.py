"""Ballast services: the shared kit and one package per service."""
