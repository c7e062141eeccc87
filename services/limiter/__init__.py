"""The limiter service."""
