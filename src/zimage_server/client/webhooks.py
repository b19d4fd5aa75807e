"""Checking that a webhook really comes from the server (the Standard Webhooks scheme)."""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any

from zimage_server.client.errors import WebhookVerificationError


def verify_webhook(headers: Mapping[str, str], body: bytes | str, secret: str) -> dict[str, Any]:
    """Verify a delivery and return its JSON payload: the task envelope, as a GET returns it.

    `headers` are the request's headers (any case), `body` the raw body exactly as received (parse it
    only after this), `secret` the account's `whsec_...` secret from `GET /api/v1/webhook_secret`.
    Raises WebhookVerificationError when a header is missing, the signature does not match, or the
    timestamp is more than five minutes away from now (a replayed delivery).
    """
    # Imported here so that a client that never receives webhooks does not need the package loaded.
    from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook
    from standardwebhooks.webhooks import WebhookVerificationError as _Invalid

    try:
        payload = Webhook(secret).verify(body, dict(headers.items()))
    except (_Invalid, EmptyWebhookSecretError) as exc:
        raise WebhookVerificationError(str(exc) or "invalid webhook") from exc
    except (ValueError, binascii.Error, UnicodeDecodeError, RuntimeError) as exc:
        # A malformed secret or signature header, or a body that is not JSON: not a delivery we trust.
        raise WebhookVerificationError(f"malformed webhook: {exc}") from exc
    if not isinstance(payload, dict):
        raise WebhookVerificationError("the webhook body is not a JSON object")
    return payload
