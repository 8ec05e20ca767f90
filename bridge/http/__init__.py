"""The bridge's HTTP API (ASGI, FastAPI): sync, history, groups, presence, push tokens,
settings, health and metrics, and the hooks an external broker calls.

::

    request ─▶ edge (Authenticate: bearer token + rate budget; BodyLimit) ─▶ router
        router: parse the path, query and body (schemas) ─▶ a service ─▶ render the answer
            sync, messages ─▶ bridge.history.History   (the join point: a member reads from
                                                          the seq they joined at)
            groups ─────────▶ bridge.groups.GroupService  (consent, limits, ``conv`` events and
                                                          the broker's membership notice)
            presence ───────▶ bridge.visibility.Visibility
            devices ────────▶ bridge.devices.DeviceService
            settings ───────▶ bridge.settings.SettingsService
            hooks/emqx ─────▶ bridge.broker_hooks.BrokerHooks  (not /v1: the hooks credential, not a token)
            healthz, metrics
        a refusal (RequestError, StoreRefusal) ─▶ errors.on_refusal ─▶ ErrorCode.http_status

The routes reach the services through one ``ApiContext`` on ``app.state`` (``context.Api``).
Every ``/v1`` call takes ``Authorization: Bearer <access token>`` (the same JWT as MQTT).
Errors are JSON: ``{"error": <stable code>, "message": <reason>}`` with a 4xx/5xx status.
"""

from bridge.http.app import create_app
from bridge.visibility import PresenceLookup

__all__ = ["PresenceLookup", "create_app"]
