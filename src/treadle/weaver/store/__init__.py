"""Persistent state behind one seam: SQLAlchemy Core on SQLite (default) or PostgreSQL."""
