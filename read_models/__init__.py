"""Projections of the log: each reads events and says which rows to keep, exactly once."""
