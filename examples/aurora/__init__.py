"""The Aurora chatbot service on tidings (see README.md)."""
