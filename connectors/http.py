"""Outbound HTTP(S): POST (or PUT...) each delivery to a partner's URL with httpx, either the raw
payload or a JSON envelope; 2xx is success, 408/425/429/5xx retry, other statuses dead-letter.

The JSON envelope (`body = "json"`, also used by the MQTT destination) is one object:

    {"message_id": ..., "delivery_id": ..., "channel": ..., "destination": ...,
     "content_type": ..., "metadata": {...}, "payload": "..."}          # HL7 v2 (ER7/XML)
     ... "payload_base64": "..."}                                         # anything else

For HL7 v2 content types the payload is given as text decoded as ISO-8859-1 (latin-1): that
decoding is lossless, `payload.encode("latin-1")` gives back the exact bytes sent, whatever
the message's own charset (MSH-18) is. Other payloads are base64.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from typing import Any, Literal

import httpx
import structlog

from connectors.destination import Delivery, DeliveryOutcome, PermanentFailure, TemporaryFailure
from connectors.file import safe_basename

__all__ = ["RETRYABLE_STATUSES", "HttpDestination", "is_hl7_v2", "json_envelope"]

RETRYABLE_STATUSES = frozenset({408, 425, 429})
MAX_RESPONSE_KEPT = 64 * 1024
HL7_V2_TYPES = ("application/hl7-v2", "x-application/hl7-v2", "application/x-hl7")

log = structlog.get_logger("relais.out.http")


def is_hl7_v2(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip().lower()
    return base.startswith(HL7_V2_TYPES)


def json_envelope(delivery: Delivery) -> bytes:
    """The JSON form of a delivery shared by the HTTP and MQTT destinations (see module doc)."""
    body: dict[str, Any] = {
        "message_id": delivery.message_id,
        "delivery_id": delivery.delivery_id,
        "channel": delivery.channel,
        "destination": delivery.destination,
        "content_type": delivery.content_type,
        "metadata": delivery.metadata,
    }
    if is_hl7_v2(delivery.content_type):
        body["payload"] = delivery.payload.decode("latin-1")
    else:
        body["payload_base64"] = base64.b64encode(delivery.payload).decode("ascii")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


class HttpDestination:
    """Send each delivery as one HTTP request; the whole exchange is bounded by `timeout`.

    Every request carries `Idempotency-Key: <delivery_id>` (the same on every retry of a
    delivery) and `X-Relais-Message-Id`, so the partner can recognise a redelivery.
    Redirects are not followed (a 3xx is a configuration problem: PermanentFailure).
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        method: str = "POST",
        headers: dict[str, str] | None = None,
        bearer_token: str | None = None,
        timeout: float = 10.0,
        verify: bool | ssl.SSLContext = True,
        body: Literal["raw", "json"] = "raw",
    ) -> None:
        self.name = name
        self.url = url
        self.method = method.upper()
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.body = body
        self._bearer_token = bearer_token
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), verify=verify, follow_redirects=False, trust_env=False
        )

    def _request_parts(self, delivery: Delivery) -> tuple[dict[str, str], bytes]:
        headers = dict(self.headers)
        if self.body == "json":
            content = json_envelope(delivery)
            headers["Content-Type"] = "application/json"
        else:
            content = delivery.payload
            headers["Content-Type"] = delivery.content_type or "application/octet-stream"
            if delivery.metadata.get("filename"):  # a routed document: its own file name
                name = safe_basename(str(delivery.metadata["filename"]))
                headers["Content-Disposition"] = f'attachment; filename="{name}"'
        headers["Idempotency-Key"] = delivery.delivery_id
        headers["X-Relais-Message-Id"] = delivery.message_id
        if self._bearer_token:
            headers["Authorization"] = f"Bearer {self._bearer_token}"
        return headers, content

    async def deliver(self, delivery: Delivery) -> DeliveryOutcome:
        headers, content = self._request_parts(delivery)
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.request(self.method, self.url, content=content, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            raise self._temporary(delivery, f"no HTTP response within {self.timeout:g} s") from None
        except httpx.TransportError as e:
            raise self._temporary(delivery, f"HTTP transport error ({type(e).__name__})") from None
        status = response.status_code
        detail = f"HTTP {status}"
        kept = response.content[:MAX_RESPONSE_KEPT]
        if 200 <= status < 300:
            log.debug("http_delivered", destination=self.name, delivery_id=delivery.delivery_id,
                      attempt=delivery.attempt, status=status)  # fmt: skip
            return DeliveryOutcome(detail=detail, response=kept)
        if status in RETRYABLE_STATUSES or status >= 500:
            raise self._temporary(delivery, detail)
        log.warning("http_delivery_rejected", destination=self.name, delivery_id=delivery.delivery_id,
                    attempt=delivery.attempt, status=status)  # fmt: skip
        raise PermanentFailure(detail)

    def _temporary(self, delivery: Delivery, detail: str) -> TemporaryFailure:
        log.warning("http_delivery_failed", destination=self.name, delivery_id=delivery.delivery_id,
                    attempt=delivery.attempt, reason=detail)  # fmt: skip
        return TemporaryFailure(detail)

    async def close(self) -> None:
        await self._client.aclose()
