"""Push notifications (APNs, FCM) for devices that are offline.

::

    bridge pipeline ──on_stored(message, recipients, preview)──▶ PushDispatcher.notify
        ─▶ intake: devices with a token that are not connected ─▶ push queue (storage), one job
           per (user, device, conv), due when the coalescing window closes
    delivery loop ──claim due jobs──▶ compose one notification per burst
        ─▶ provider (send_with_retries) ─▶ ApnsProvider ─▶ APNs (HTTP/2, aioapns)
                                          FcmProvider  ─▶ FCM v1 (firebase-admin)
                                          LogProvider  ─▶ the log (the embedded default)
        ─▶ an invalid token is deleted; the job is finished (never sent twice)

``push.dispatcher`` holds ``PushDispatcher`` (a service with the intake and delivery workers);
``push.base`` the provider interface (``PushProvider``, ``PushMessage``, the ``Outcome`` of a
send, ``send_with_retries``), which ``push.apns``, ``push.fcm`` and ``push.log`` implement.
``mqchat.app`` builds the configured providers and the dispatcher and hands ``notify`` to the
pipeline. Push imports ``storage`` (messages and the push queue) and never ``broker`` or ``bridge``.
"""
