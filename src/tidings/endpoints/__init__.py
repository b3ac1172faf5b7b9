"""Protocols served beside the native one, as endpoints over the node:
Centrifugo's client protocol (:mod:`.centrifugo`)."""
