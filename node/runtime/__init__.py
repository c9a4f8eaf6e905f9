"""The daemon's plumbing."""
