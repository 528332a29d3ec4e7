"""SQLite stores shared by the daemons: the only channel between them (see docs/DESIGN.md)."""
