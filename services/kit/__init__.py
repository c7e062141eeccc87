"""Plumbing every Ballast service uses: config, serving, telemetry, logging, errors, clients."""
