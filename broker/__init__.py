"""The MQTT broker: amqtt, made fit for mobile chat by plugins and a subclass.

::

    phone ──CONNECT(user, JWT, client id = device)──▶ JwtAuthPlugin ──✗──▶ CONNACK refused
                                                        │ identity → session.attributes
    phone ──PUBLISH / SUBSCRIBE──▶ TopicAclPlugin ──✗──▶ SUBACK 0x80 / error envelope, dropped
                                                        │
                                  MqchatBroker routing ──▶ subscribers (the bridge on u/+/+/out)

    MetricsPlugin: connected clients, connects refused.

The bridge connects as the service user with an HMAC-derived credential that no device token
can equal (see ``mqchat.tokens``). ``broker`` never imports ``bridge``; ``mqchat.app`` wires them.
"""
