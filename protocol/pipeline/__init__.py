"""Pipeline wire."""
