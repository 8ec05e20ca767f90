"""Push notifications (APNs, FCM) for devices that are offline.

::

    bridge ──stored message──▶ dispatcher ──coalesce per (user, device, conv)──▶ provider ──▶ APNs / FCM

`push.providers` holds the provider layer (`ApnsProvider`, `FcmProvider`, `LogProvider`, `send_with_retries`);
the dispatcher is not wired yet: see the push issue.
"""
