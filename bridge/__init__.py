"""The bridge: every request from a device goes through one pipeline, whatever carries it, and
the HTTP API shares the pipeline's rules through services.

::

    adapter (MQTT client on u/+/+/out │ in-broker hook)
        │  (user, device) from the topic, raw payload
        ▼
    Pipeline.handle ── parse + validate ──✗──▶ error ─────────────────▶ u/{user}/{device}/in
        │ membership (history.require_member; dm:{a}:{b}: the sender must be a or b)
        ▼
    MessageLog.append ──── dedup (sender, id) → seq + ULID mid → durable group commit
        │
        ├──▶ ack ───────────────────────────────────────────────────▶ u/{user}/{device}/in
        └──▶ msg ────────────────────────────────────────────────────▶ u/{member}/in (each)

    HTTP API (bridge.http: routers that parse, call a service, render)
        sync, history ──▶ history.History      (the join point; require_member, which the
        │                                        pipeline's reads use too)
        groups ─────────▶ groups.GroupService ─▶ conv events + broker notice ─▶ adapter
        presence ───────▶ visibility.Visibility
        push tokens ────▶ devices.DeviceService
        settings ───────▶ settings.SettingsService
        logout, deletion, admin API ──▶ accounts.AccountService ─▶ revoke + LOGOUT event ─▶ adapter
        │                               accounts.AccountDeletions (jobs; resumes begun deletions)
        /healthz, /metrics

The pipeline returns what to publish where (``Outgoing``); the adapter publishes it. The
pipeline never raises on input: every bad request becomes an ``error`` envelope. A refusal
(``RequestError``, a store's ``StoreRefusal``) is worded once (``refusals``) and translated
once on each side: into an ``error`` envelope by the pipeline, into ``ErrorCode.http_status``
by the HTTP API.
"""
