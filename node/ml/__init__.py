"""Models and data."""
