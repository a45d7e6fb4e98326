"""Publishing to ``loquetier.results`` and ``loquetier.dlq``, retried through broker outages.

Results are keyed by request_id / job_id so that one request's records stay ordered on
one partition. ``publish`` waits for the broker's acknowledgement (the caller marks the
source record done only afterwards); ``stream`` only enqueues (token records are a
best-effort preview, the "result" record is the one that counts).

A request with ``reply_to`` gets its records on that topic (a gateway's own). A reply topic the
worker has not written to yet is looked up in the background (:mod:`.reply_topics`): its token
records wait for the answer in order, nothing else does, and a missing topic's records are
dropped (the outcome stays in the request's row). A record for a reply topic that cannot be
written (its gateway's topic was deleted) is tried for ``reply_timeout_s`` at most and then
dropped. So one missing topic, or many made-up names, never hold up the worker's other work.

A record the broker can never take (over the size limit, invalid) is logged and skipped:
``publish`` returns False instead of retrying it forever, which once wedged a consumer.
Transient failures (broker away, leader moving) are retried until :meth:`give_up_at`'s
deadline, which a stopping worker sets so that SIGTERM always ends in bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidMessageError,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
    UnsupportedForMessageFormatError,
)

from loquetier.codec import Record
from loquetier.messages import DeadLetter, encode_record
from loquetier.settings import KafkaSettings

from .reply_topics import ReplyTopics
from .topics import forbid_auto_create

log = logging.getLogger(__name__)

# Refusals that the same bytes will meet again however often they are sent.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    InvalidMessageError,
    InvalidTimestampError,
    InvalidTopicError,
    UnsupportedForMessageFormatError,
)


class PublishAborted(Exception):
    """The worker is stopping and the broker did not take the record in time."""


class Publisher:
    def __init__(self, bootstrap: str, kafka: KafkaSettings, *, worker_id: str, max_backoff_s: float = 2.0):
        self._kafka = kafka
        self._worker_id = worker_id
        self._max_backoff_s = max_backoff_s
        self.max_request_bytes = kafka.max_record_bytes + 64 * 1024
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=f"{kafka.client_id}-{worker_id}",
            acks="all",
            linger_ms=2,
            max_request_size=self.max_request_bytes,
            request_timeout_ms=10_000,
            retry_backoff_ms=200,
            metadata_max_age_ms=5_000,
        )
        forbid_auto_create(self._producer)
        self.closing = False
        self._deadline: float | None = None
        self.num_published = 0
        self.num_retries = 0
        self._num_dropped = 0
        self.replies = ReplyTopics(self._producer, kafka.reply_prefix)
        self.num_skipped = 0

    @property
    def reply_prefix(self) -> str:
        return self._kafka.reply_prefix

    @property
    def num_replies_dropped(self) -> int:
        """Records dropped because their reply topic is missing or could not be written."""
        return self._num_dropped + self.replies.num_dropped

    async def start(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._producer.start()
                return
            except KafkaError as exc:
                if self.closing or self._is_past_deadline():
                    raise
                log.warning("broker unavailable at start, retrying", extra={"error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, self._max_backoff_s)

    def give_up_at(self, deadline: float) -> None:
        """Stop retrying at ``deadline`` (``time.monotonic()``); the earliest deadline wins."""
        self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)

    def _is_past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    async def stop(self) -> None:
        self.closing = True
        await self.replies.stop()
        try:
            await asyncio.wait_for(self._producer.stop(), timeout=5.0)
        except (TimeoutError, KafkaError) as exc:  # unsent records stay undone: redelivered later
            log.warning("producer did not flush before stopping", extra={"error": repr(exc)})

    async def publish(self, record: Record, key: str | None, *, topic: str | None = None) -> bool:
        """Send and wait for the acknowledgement, retrying until the broker takes it.

        Returns False when the record can never be sent (too large, invalid): it is logged
        and skipped. Raises :class:`PublishAborted` once past the stop deadline.
        """
        try:
            value = encode_record(record)
        except (ValueError, TypeError, OverflowError) as exc:
            return self._skip(topic or self._kafka.results_topic, key, exc)
        return await self._send(topic or self._kafka.results_topic, key, value)

    async def stream(self, record: Record, key: str, *, topic: str | None = None) -> None:
        """Enqueue without waiting for the acknowledgement (token previews); a record for a reply
        topic not known yet is held until its lookup ends, so this never waits on one."""
        topic = topic or self._kafka.results_topic
        value = encode_record(record)
        if not self.replies.is_known(topic):
            self.replies.hold(topic, value, key.encode())
            return
        try:
            await self._producer.send(topic, value, key=key.encode())
        except KafkaError as exc:
            log.warning("token record not sent", extra={"error": str(exc), "key": key, "topic": topic})
            if isinstance(exc, UnknownTopicOrPartitionError):  # gone, not a broker blip
                self.replies.mark_down(topic)

    async def dead_letter(self, letter: DeadLetter) -> bool:
        return await self.publish(
            letter.model_copy(update={"worker_id": self._worker_id}), None, topic=self._kafka.dlq_topic
        )

    def _skip(self, topic: str, key: str | None, exc: BaseException) -> bool:
        self.num_skipped += 1
        log.error(
            "record can never be published, skipped",
            extra={"topic": topic, "key": (key or "")[:256], "error": repr(exc)[:500]},
        )
        return False

    async def _send(self, topic: str, key: str | None, value: bytes) -> bool:
        raw_key = key.encode() if key else None
        if len(value) + len(raw_key or b"") > self.max_request_bytes:
            too_large = MessageSizeTooLargeError(f"{len(value)} bytes, the limit is {self.max_request_bytes}")
            return self._skip(topic, key, too_large)
        backoff = 0.1
        is_reply = self.replies.is_reply(topic)
        give_up = time.monotonic() + self._kafka.reply_timeout_s if is_reply else None
        if not await self.replies.usable(topic, self._kafka.reply_timeout_s):
            log.warning("reply topic unknown, record dropped", extra={"topic": topic[:256]})
            self._num_dropped += 1
            return False
        while True:
            try:
                await self._attempt(topic, raw_key, value)
                self.num_published += 1
                return True
            except PERMANENT_ERRORS as exc:
                return self._skip(topic, key, exc)
            except (KafkaError, TimeoutError) as exc:
                if self.closing or self._is_past_deadline():
                    raise PublishAborted(f"{topic}: {exc!r}") from exc
                if give_up is not None and time.monotonic() >= give_up:
                    log.warning("reply topic unwritable, record dropped", extra={"topic": topic, "error": repr(exc)})
                    self._num_dropped += 1
                    self.replies.mark_down(topic)
                    return False
                self.num_retries += 1
                log.warning("publish failed, retrying: %s %r", topic, exc, extra={"topic": topic, "error": repr(exc)})
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, self._max_backoff_s)

    async def _attempt(self, topic: str, key: bytes | None, value: bytes) -> None:
        send = self._producer.send_and_wait(topic, value, key=key)
        if self._deadline is None:
            await send
            return
        await asyncio.wait_for(send, timeout=max(0.05, self._deadline - time.monotonic()))
