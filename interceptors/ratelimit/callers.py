"""Who a call is counted as: the key its counters live under, and the rule that applies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpc import aio

from interceptors.method import MethodInfo
from interceptors.ratelimit.rules import DEFAULT_TIER, Rule, RuleBook
from learnmesh.kernel import principal

# context -> (the rule, whose counters, words added to a refusal's message)
Counted = Callable[[aio.ServicerContext[Any, Any]], tuple[Rule, str, str]]


def counted_as(method: MethodInfo, rules: RuleBook) -> Counted:
    """How calls of ``method`` are counted: login, register and password reset by client
    address; others by user id at the caller's tier, or by address at the free tier when
    nobody is signed in."""
    rule = rules.address_rule(method.rate_class)
    if rule is not None:
        address_rule = rule

        def by_address(_context: aio.ServicerContext[Any, Any]) -> tuple[Rule, str, str]:
            return address_rule, "addr:" + principal.call_info().client_address, ""

        return by_address
    tiered = rules.tier_rules(method.rate_class)
    anonymous = tiered[DEFAULT_TIER]

    def by_caller(_context: aio.ServicerContext[Any, Any]) -> tuple[Rule, str, str]:
        caller = principal.current_or_none()
        if caller is None:
            who = "addr:" + principal.call_info().client_address
            return anonymous, who, " (not signed in: counted by address)"
        return tiered.get(caller.tier, anonymous), "user:" + caller.user_id, ""

    return by_caller
