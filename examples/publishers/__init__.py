"""Publishing to tidings from the Python backends people run (docs/publishing.md)."""
