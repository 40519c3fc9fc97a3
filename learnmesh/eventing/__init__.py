"""The event backbone: a transactional outbox per service, a relay that publishes it, a bus
(in-process by default, NATS JetStream at scale) and idempotent consumers.

Named ``eventing`` because ``learnmesh.events`` is the generated ``learnmesh.events.v1``
package. docs/events.md says how services use it.
"""
