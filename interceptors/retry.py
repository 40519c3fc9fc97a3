"""Retries, as gRPC's native retry policy generated from the protos.

A method is retried only when its proto says NO_SIDE_EFFECTS (the reference document's
"read" policy) or IDEMPOTENT ("idempotent write"); methods marked ``critical`` in their
policy option get at most one retry a second later. Everything else is never retried.
grpc-core does the rest natively: exponential backoff with jitter, server pushback
(``grpc-retry-pushback-ms``), never past the deadline, and a per-channel retry budget
(``retryThrottling``) so a failing service is not hammered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool

from interceptors.method import IDEMPOTENT, NO_SIDE_EFFECTS
from learnmesh.common.v1 import access_pb2


@dataclass(frozen=True)
class RetryPolicy:
    """A retry policy as a small value (after google-api-core's Retry)."""

    max_attempts: int  # first try included; grpc caps it at 5
    initial: float  # seconds before the first retry (upper bound: jitter picks below it)
    maximum: float
    multiplier: float
    codes: tuple[str, ...] = ("UNAVAILABLE",)

    def as_service_config(self) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial}s",
            "maxBackoff": f"{self.maximum}s",
            "backoffMultiplier": self.multiplier,
            "retryableStatusCodes": list(self.codes),
        }


# The reference document's policies (§2.4): maxRetries 3, 100 ms … 2 s, x2; 200 ms … 5 s, x2;
# critical: 1 retry after 1 s on 503 only.
READ = RetryPolicy(max_attempts=4, initial=0.1, maximum=2.0, multiplier=2.0)
IDEMPOTENT_WRITE = RetryPolicy(max_attempts=4, initial=0.2, maximum=5.0, multiplier=2.0)
CRITICAL = RetryPolicy(max_attempts=2, initial=1.0, maximum=1.0, multiplier=1.0)


def policy_for(method: Any) -> RetryPolicy | None:
    """The policy of a MethodDescriptor, or None when it must not be retried."""
    options = method.GetOptions()
    level = options.idempotency_level
    if level not in (NO_SIDE_EFFECTS, IDEMPOTENT):
        return None
    if options.Extensions[access_pb2.policy].critical:
        return CRITICAL
    return READ if level == NO_SIDE_EFFECTS else IDEMPOTENT_WRITE


def service_config(
    services: Iterable[str], *, budget_tokens: int = 10, budget_ratio: float = 0.1
) -> str:
    """The ``grpc.service_config`` JSON for channels calling ``services`` (full names)."""
    pool = descriptor_pool.Default()
    groups: dict[RetryPolicy, list[dict[str, str]]] = {}
    for full_name in services:
        for method in pool.FindServiceByName(full_name).methods:
            policy = policy_for(method)
            if policy is not None:
                groups.setdefault(policy, []).append({"service": full_name, "method": method.name})
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {"name": names, "retryPolicy": policy.as_service_config()}
            for policy, names in groups.items()
        ],
        "retryThrottling": {"maxTokens": budget_tokens, "tokenRatio": budget_ratio},
    }
    return json.dumps(config)
