"""The kernel of the runtime: errors, the call context, logs and token verification.

Links (``interceptors/``), services and the assembly all build on it; it imports none of
them.
"""
