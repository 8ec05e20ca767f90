"""Push notifications (APNs, FCM) for devices that are offline. Not wired yet: see the push issue.

::

    bridge ──stored message──▶ dispatcher ──coalesce per (user, device, conv)──▶ provider ──▶ APNs / FCM
"""
