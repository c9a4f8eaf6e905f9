"""The all-reduce round."""
