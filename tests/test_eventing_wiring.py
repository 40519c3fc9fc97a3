"""Settings choose the bus and configure the relay and consumers."""

from __future__ import annotations

import pytest

from learnmesh import config
from learnmesh.eventing.jetstream import JetStreamBus
from learnmesh.eventing.memory import InProcessBus
from learnmesh.eventing.wiring import make_bus


def test_the_in_process_bus_is_the_default():
    bus = make_bus(config.load(env={}))
    assert isinstance(bus, InProcessBus) and bus.duplicate_window == 900.0


def test_a_nats_url_chooses_jetstream_with_the_settings():
    settings = config.load(
        env={
            "LEARNMESH_BUS_URL": "nats://127.0.0.1:4222",
            "LEARNMESH_EVENTS_DUPLICATE_WINDOW": "600",
            "LEARNMESH_EVENTS_STREAM_REPLICAS": "3",
        }
    )
    bus = make_bus(settings)
    assert isinstance(bus, JetStreamBus)
    config_ = bus.stream_config()
    assert (config_.duplicate_window, config_.num_replicas, config_.name) == (
        600.0,
        3,
        "LEARNMESH_EVENTS",
    )
    assert config_.subjects == ["learnmesh.events.>"]


def test_a_bus_url_that_is_not_nats_stops_start_up():
    with pytest.raises(config.ConfigError, match="LEARNMESH_BUS_URL"):
        config.load(env={"LEARNMESH_BUS_URL": "redis://localhost"})


def test_a_duplicate_window_shorter_than_the_retry_horizon_is_refused():
    settings = config.load(
        env={"LEARNMESH_EVENTS_DUPLICATE_WINDOW": "10", "LEARNMESH_EVENTS_RELAY_RETRY_MAX": "30"}
    )
    with pytest.raises(config.ConfigError, match="duplicate_window"):
        make_bus(settings)
