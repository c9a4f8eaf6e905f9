"""The swarmnode command."""
