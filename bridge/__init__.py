"""The bridge: every request from a device goes through one pipeline, whatever carries it.

::

    adapter (MQTT client on u/+/+/out │ in-broker hook)
        │  (user, device) from the topic, raw payload
        ▼
    Pipeline.handle ── parse + validate ──✗──▶ error ─────────────────▶ u/{user}/{device}/in
        │ membership (dm:{a}:{b}: the sender must be a or b)
        ▼
    MessageStore.append ── dedup (sender, id) → seq + ULID mid → durable group commit
        │
        ├──▶ ack ───────────────────────────────────────────────────▶ u/{user}/{device}/in
        └──▶ msg ────────────────────────────────────────────────────▶ u/{member}/in (each)

    HTTP API (ASGI): history/catch-up reads from the same MessageStore; /healthz; /metrics

The pipeline returns what to publish where (``Outgoing``); the adapter publishes it. The
pipeline never raises on input: every bad request becomes an ``error`` envelope.
"""
