"""learnmesh: the gRPC service backbone of an e-learning platform.

This package is the runtime (configuration, database, server and client factories, CLI).
The protoc output joins it from ``generated/`` as ``learnmesh.<area>.v1`` (see setup.py).
"""
