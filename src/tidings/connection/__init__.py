"""One client connection: a nursery with its reader, writer and pinger.

:mod:`.connection` runs a client from upgrade to close; :mod:`.endpoint` and
:mod:`.session` are what applications plug in and see of it; :mod:`.limits`
and :mod:`.ratelimit` bound it. It is written against the transport
*interface* (:mod:`tidings.transport.base`) only.
"""
