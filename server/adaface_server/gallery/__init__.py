"""Persistent face galleries: SQLite as the source of truth, in-memory exact search."""
