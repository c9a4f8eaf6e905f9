"""Federated jobs."""
