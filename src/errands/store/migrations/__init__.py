"""Versioned schema migrations, one folder of numbered ``.sql`` files per store."""
