"""The server and client interceptor chains: one module per concern.

Each module offers a server link (a ``ServerLink`` wrapping a method's behaviour) and, where
the concern has one, a client side. Nothing here imports from ``services/``.
"""
