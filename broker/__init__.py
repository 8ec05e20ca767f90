"""The MQTT broker: amqtt, made fit for mobile chat by plugins, a subclass and named parts.

::

    phone ──TCP │ TLS │ WebSocket (websocket: frames as a stream) │ WSS──▶ connect.read_connect
                      │  CONNECT framed by mqchat.mqtt_codec, protocol level checked
                      │
                      ▼
                   Admission ──✗──▶ CONNACK refused; nothing else changes
                      │  limits (connections, connects/s per IP)
                      │  JwtAuthPlugin: identity → session.attributes (before any takeover);
                      │  a revoked token (storage.revocations) refused; closed at the token's exp
                      │  session resolution (clean: new; persistent: the device's own)
                      ▼
                   MqchatProtocolHandler (per connection: codec-framed reader, keepalive enforced)
                      │ PUBLISH on its own u/{user}/{device}/out ──▶ inbound hook (in-broker bridge)
                      │ SUBSCRIBE ──▶ TopicAclPlugin ──✗──▶ SUBACK 0x80      (MembershipCache answers)
                      │ other PUBLISH ──▶ TopicAclPlugin ──✗──▶ error envelope, dropped
                      ▼
                   Delivery ── SubscriptionIndex ──▶ subscribers' sockets (bounded queues and buffers)

    connect/disconnect ──▶ PresenceReports ──▶ PresenceRegistry ──▶ retained p/{user}
    $mqchat/membership ──▶ MembershipSync ──▶ MembershipCache invalidated, subscriptions rechecked
    $mqchat/logout ──▶ MqchatBroker.logged_out ──▶ the device's connections closed, sessions dropped
    RevocationSweep ──▶ every device connection rechecked against the revocation list (a lost logout)

``MqchatBroker`` (``broker.server``) holds the adaptation to amqtt 0.12.1, the listeners (TCP,
TLS with the process's ``mqchat.tls`` context, WebSocket) and the ending of device connections
(takeover, logout, token expiry), and hands the rest to these parts; ``broker.serve`` runs one
in a process (its amqtt config, ``serve_broker``, GC tuning). ``MetricsPlugin`` counts connected
clients. The bridge connects as the service user with an HMAC-derived credential that no device
token can equal (see ``mqchat.tokens``).
``broker`` never imports ``bridge``; ``mqchat.app`` wires them.
"""
