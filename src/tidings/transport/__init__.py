"""How bytes reach sockets.

``base`` is the contract the connection code is written against; ``builtin``
(our HTTP/1.1 + WebSocket server: h11, and our own frame parser) and ``asgi`` (any ASGI
server, hypercorn's Trio worker in particular) implement it. Nothing outside
this package imports an implementation except the server that picks one.
"""
