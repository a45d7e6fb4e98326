"""The worker never creates a topic by touching it.

A broker that auto-creates topics (Kafka with ``auto.create.topics.enable``, tansu) creates a
missing topic the moment a client asks for its metadata, with the broker's default partition
count, and races with the explicit creation (``loquetier up``, ``loquetier-worker``,
:func:`loquetier.services.create_topics`) that uses the configured count. A worker that
comes back to a broker that lost its topics would otherwise recreate them itself, with the
wrong layout, while the operator creates them too. So the worker's Kafka clients ask with
``allow_auto_topic_creation=false``: a missing topic is reported missing, the consumer waits
for it and the publisher retries until it exists.

aiokafka has no option for this; the flag is set per client by giving that client's metadata
update the same code with a request class that always says false. Other clients in the
process (a user's, a test's) keep aiokafka's default.
"""

from __future__ import annotations

import types
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.protocol.metadata import MetadataRequest


class _NoAutoCreate(MetadataRequest):  # type: ignore[misc]
    def __init__(self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = None) -> None:
        super().__init__(topics, False)


def forbid_auto_create(kafka_client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Make this producer's or consumer's metadata requests never create a topic."""
    inner: Any = getattr(kafka_client, "client", None) or kafka_client._client
    update = type(inner)._metadata_update
    if "MetadataRequest" not in update.__code__.co_names:
        raise RuntimeError("this aiokafka builds metadata requests differently; update workers/topics.py")
    patched = types.FunctionType(
        update.__code__, {**update.__globals__, "MetadataRequest": _NoAutoCreate}, update.__name__,
        update.__defaults__, update.__closure__,
    )
    inner._metadata_update = types.MethodType(patched, inner)
