"""Norn: the deploy platform's WebSocket hub (one envelope, every client hears all) on tidings."""
