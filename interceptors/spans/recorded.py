"""A sampled span as the SDK's ``Span`` would record it, in plain fields, handed to the
provider's processors as the SDK's own ``ReadableSpan`` when it ends."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from time import time_ns

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util import types

from interceptors.spans.fast_path import FastPath

_logger = logging.getLogger("interceptors.spans")

_UNSET = Status(StatusCode.UNSET)
# Attribute values the SDK keeps exactly as given when no length limit applies.
_PLAIN_VALUES = frozenset({str, int, float, bool})


class RecordedSpan(trace.Span, ReadableSpan):
    """A sampled span, as the SDK's ``Span`` would record it, in plain fields.

    Like the SDK's Span it is also a ``ReadableSpan`` (processors' ``on_start`` read it as
    one); its fields are ReadableSpan's own, set here without that class's constructor.
    Values the SDK keeps as they are (str, int, float, bool, with no length limit, under
    the count limit) are stored directly; anything else turns the attributes into the SDK's
    BoundedAttributes, which cleans, cuts and counts as the SDK does. Events and links
    always go through the SDK's containers.
    """

    def __init__(
        self,
        path: FastPath,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, types.AnyValue],
    ) -> None:
        self._path = path
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes: dict[str, types.AnyValue] | BoundedAttributes = attributes
        self._events: Sequence[Event] = ()
        self._links: Sequence[Link] = ()
        self._status = _UNSET
        self._resource = path.tracer.resource
        self._instrumentation_scope = path.scope
        self._instrumentation_info = path.tracer.instrumentation_info
        self._start_time: int | None = time_ns()
        self._end_time: int | None = None

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]  # always set, unlike ReadableSpan's

    def is_recording(self) -> bool:
        return self._end_time is None

    def _ended(self, what: str) -> bool:
        if self._end_time is None:
            return False
        _logger.warning("Tried calling %s on an ended span.", what)
        return True

    def _bounded(self) -> BoundedAttributes:
        attributes = self._attributes
        if type(attributes) is dict:
            limits = self._path.limits
            attributes = self._attributes = BoundedAttributes(
                limits.max_span_attributes,
                attributes,
                immutable=False,
                max_value_len=limits.max_span_attribute_length,
            )
        return attributes  # type: ignore[return-value]

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._ended("set_attribute"):
            return
        attributes = self._attributes
        if (
            type(attributes) is dict
            and type(value) in _PLAIN_VALUES
            and type(key) is str
            and key
            and (key in attributes or len(attributes) < self._path.max_attributes)
        ):
            attributes.pop(key, None)  # as the SDK does: a key set again moves to the end
            attributes[key] = value
        else:
            self._bounded()[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._ended("add_event"):
            return
        limits = self._path.limits
        if not isinstance(self._events, BoundedList):
            self._events = BoundedList(limits.max_events)
        bounded = self._frozen(attributes, limits.max_event_attributes)
        self._events.append(Event(name=name, attributes=bounded, timestamp=timestamp))

    def add_link(self, context: SpanContext | None, attributes: types.Attributes = None) -> None:
        if not (context and (context.is_valid or attributes or context.trace_state)):
            return  # the SDK's rule: such a link says nothing
        if self._ended("add_link"):
            return
        limits = self._path.limits
        if not isinstance(self._links, BoundedList):
            self._links = BoundedList(limits.max_links)
        self._links.append(Link(context, self._frozen(attributes, limits.max_link_attributes)))

    def _frozen(self, attributes: types.Attributes, count: int | None) -> BoundedAttributes:
        """An event's or a link's attributes, cleaned and cut as the SDK does."""
        limits = self._path.limits
        return BoundedAttributes(
            count, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )

    def update_name(self, name: str) -> None:
        if not self._ended("update_name"):
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """The SDK's rules: OK is final, UNSET is never set."""
        if self._ended("set_status") or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                _logger.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`",
                    description,
                )
            self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    # The SDK's own: it needs nothing of the span but add_event.
    record_exception = sdk_trace.Span.record_exception

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            _logger.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        path = self._path
        path.on_ending(self)
        path.on_end(
            ReadableSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=self._resource,
                attributes=self._attributes,
                events=self._events,
                links=self._links,
                kind=self._kind,
                status=self._status,
                instrumentation_info=self._instrumentation_info,
                start_time=self._start_time,
                end_time=self._end_time,
                instrumentation_scope=self._instrumentation_scope,
            )
        )
