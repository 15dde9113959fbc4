"""Outbound MQTT: publish each delivery to a broker topic with aiomqtt (QoS 1 by default, which
waits for the broker's PUBACK); one connected client per destination, reconnected on failure."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import uuid
from typing import Literal

import aiomqtt
import structlog

from connectors.destination import Delivery, DeliveryOutcome, PermanentFailure, TemporaryFailure
from connectors.file import check_template
from connectors.http import json_envelope

__all__ = ["DEFAULT_TOPIC", "TOPIC_PLACEHOLDERS", "MqttDestination", "check_topic_template"]

DEFAULT_TOPIC = "relais/{channel}/{destination}"
# Only routing facts: never a patient identifier in a topic (topics end up in broker logs and ACLs).
TOPIC_PLACEHOLDERS = frozenset({"channel", "destination", "message_type", "trigger_event", "sending_facility"})

_UNSAFE_LEVEL = re.compile(r"[^A-Za-z0-9._-]")

log = structlog.get_logger("relais.out.mqtt")


def check_topic_template(template: str) -> str:
    """Raise ValueError unless the template is a valid publish topic with known placeholders."""
    check_template(template, TOPIC_PLACEHOLDERS)
    if not template or any(c in template for c in "+#\x00"):
        raise ValueError("a publish topic must be non-empty, without the wildcards + and #")
    return template


def _level(value: object) -> str:
    """One topic level from a metadata value: no '/', no wildcards, never empty."""
    return _UNSAFE_LEVEL.sub("_", str(value or "")) or "unknown"


class MqttDestination:
    """Publish each delivery's payload (or its JSON envelope, `body="json"`) to `topic`.

    With QoS 1 or 2 `deliver` returns only once the broker has acknowledged the message
    (aiomqtt's publish waits for PUBACK/PUBCOMP); the whole call is bounded by `timeout`.
    Any broker or network error is a TemporaryFailure and drops the client, so the next
    delivery connects afresh.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int = 1883,
        *,
        topic: str = DEFAULT_TOPIC,
        qos: Literal[0, 1, 2] = 1,
        retain: bool = False,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        client_id: str | None = None,
        timeout: float = 10.0,
        keepalive: int = 60,
        body: Literal["raw", "json"] = "raw",
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.topic = check_topic_template(topic)
        self.qos = qos
        self.retain = retain
        self.timeout = timeout
        self.keepalive = keepalive
        self.body = body
        self.client_id = client_id or f"relais-{_level(name)}-{uuid.uuid4().hex[:8]}"
        self._username = username
        self._password = password
        self._ssl_context = ssl_context
        self._client: aiomqtt.Client | None = None
        self._connect_lock = asyncio.Lock()

    def topic_for(self, delivery: Delivery) -> str:
        meta = delivery.metadata
        return self.topic.format_map(
            {
                "channel": _level(delivery.channel),
                "destination": _level(delivery.destination),
                "message_type": _level(meta.get("message_type")),
                "trigger_event": _level(meta.get("trigger_event")),
                "sending_facility": _level(meta.get("sending_facility")),
            }
        )

    async def deliver(self, delivery: Delivery) -> DeliveryOutcome:
        try:
            topic = self.topic_for(delivery)
        except (KeyError, ValueError) as e:  # a checked template cannot fail; be explicit anyway
            raise PermanentFailure(f"cannot build the topic ({type(e).__name__})") from None
        payload = json_envelope(delivery) if self.body == "json" else delivery.payload
        client: aiomqtt.Client | None = None
        try:
            async with asyncio.timeout(self.timeout):
                client = await self._connected()
                await client.publish(topic, payload, qos=self.qos, retain=self.retain, timeout=self.timeout)
        except (TimeoutError, aiomqtt.MqttError, OSError) as e:
            await self._drop(client)
            reason = "timeout" if isinstance(e, TimeoutError) else type(e).__name__
            log.warning("mqtt_delivery_failed", destination=self.name, delivery_id=delivery.delivery_id,
                        attempt=delivery.attempt, reason=reason)  # fmt: skip
            raise TemporaryFailure(f"MQTT publish to {self.host}:{self.port} failed ({reason})") from None
        log.debug("mqtt_delivered", destination=self.name, delivery_id=delivery.delivery_id,
                  attempt=delivery.attempt, qos=self.qos)  # fmt: skip
        return DeliveryOutcome(detail=f"published qos {self.qos}")

    async def close(self) -> None:
        async with self._connect_lock:
            client, self._client = self._client, None
        await self._disconnect(client)

    # -- internals ---------------------------------------------------------------------------

    async def _connected(self) -> aiomqtt.Client:
        async with self._connect_lock:
            if self._client is not None and _is_connected(self._client):
                return self._client
            stale, self._client = self._client, None
            await self._disconnect(stale)
            client = aiomqtt.Client(
                self.host,
                self.port,
                identifier=self.client_id,
                username=self._username,
                password=self._password,
                tls_context=self._ssl_context,
                timeout=self.timeout,
                keepalive=self.keepalive,
                clean_session=True,
            )
            try:
                await client.__aenter__()
            except BaseException:
                await self._disconnect(client)
                raise
            self._client = client
            log.info("mqtt_connected", destination=self.name, host=self.host, port=self.port,
                     tls=self._ssl_context is not None)  # fmt: skip
            return client

    async def _drop(self, client: aiomqtt.Client | None) -> None:
        """Forget a client that failed (if it is still the current one) and disconnect it."""
        async with self._connect_lock:
            if client is not None and self._client is client:
                self._client = None
        await self._disconnect(client)

    @staticmethod
    async def _disconnect(client: aiomqtt.Client | None) -> None:
        if client is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await client.__aexit__(None, None, None)
        # an unexpected disconnection is stored on a future nobody awaits once we drop the client:
        # read it, or asyncio logs "Future exception was never retrieved"
        lost = getattr(client, "_disconnected", None)
        if isinstance(lost, asyncio.Future) and lost.done() and not lost.cancelled():
            lost.exception()


def _is_connected(client: aiomqtt.Client) -> bool:
    """aiomqtt exposes no public 'connected' flag; ask the underlying paho client."""
    paho = getattr(client, "_client", None)
    return bool(paho is not None and paho.is_connected())
