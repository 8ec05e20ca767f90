"""Subscription index: route a topic in O(matching subscriptions), not O(all subscriptions).

amqtt keeps ``filter → [(session, qos), …]`` in a plain dict and, for every message, walks every
filter. ``SubscriptionIndex`` is that same dict (amqtt's own code keeps working on it) plus:

- exact filters are found by one dict lookup (the topic itself is the key);
- wildcard filters (``+``, ``#``) live in a trie walked level by level, so a publish visits
  only the branches its levels can match;
- each client's own filters are remembered, so unsubscribing all of a session is O(its filters).

MQTT rule kept: a wildcard in the first level does not match topics starting with ``$``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import Gauge

SUBSCRIPTIONS = Gauge(
    "mqchat_broker_subscriptions", "Topic filters subscribed, over all sessions", multiprocess_mode="livesum"
)


class _Node:
    __slots__ = ("children", "filter")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.filter: str | None = None  # a wildcard filter ending at this node


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class SubscriptionIndex(dict[str, list[tuple[Any, int]]]):
    """``dict[filter, list[(session, qos)]]`` with a wildcard trie and per-client filter sets."""

    def __init__(self) -> None:
        super().__init__()
        self._root = _Node()
        self._wildcards = 0
        self.by_client: dict[str, set[str]] = {}

    # --- keep the trie in step with the dict (amqtt sets and deletes keys directly) -----------

    def __setitem__(self, topic_filter: str, subscribers: list[tuple[Any, int]]) -> None:
        if topic_filter not in self and is_wildcard(topic_filter):
            node = self._root
            for level in topic_filter.split("/"):
                node = node.children.setdefault(level, _Node())
            node.filter = topic_filter
            self._wildcards += 1
        super().__setitem__(topic_filter, subscribers)

    def __delitem__(self, topic_filter: str) -> None:
        super().__delitem__(topic_filter)
        if is_wildcard(topic_filter):
            self._remove_from_trie(topic_filter)

    def pop(self, topic_filter: str, *default: Any) -> Any:
        present = topic_filter in self
        value = super().pop(topic_filter, *default)
        if present and is_wildcard(topic_filter):
            self._remove_from_trie(topic_filter)
        return value

    def clear(self) -> None:
        super().clear()
        self._root = _Node()
        self._wildcards = 0
        SUBSCRIPTIONS.dec(sum(len(filters) for filters in self.by_client.values()))
        self.by_client.clear()

    def __repr__(self) -> str:
        # amqtt formats repr(subscriptions) on every SUBSCRIBE, even with DEBUG off.
        return f"<SubscriptionIndex filters={len(self)} wildcard={self._wildcards}>"

    def _remove_from_trie(self, topic_filter: str) -> None:
        path = [self._root]
        for level in topic_filter.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        path[-1].filter = None
        self._wildcards -= 1
        levels = topic_filter.split("/")
        for depth in range(len(levels), 0, -1):  # prune empty branches
            node = path[depth]
            if node.children or node.filter is not None:
                break
            del path[depth - 1].children[levels[depth - 1]]

    # --- per-client filters ---------------------------------------------------------------------

    def remember(self, client_id: str, topic_filter: str) -> None:
        filters = self.by_client.setdefault(client_id, set())
        if topic_filter not in filters:
            filters.add(topic_filter)
            SUBSCRIPTIONS.inc()

    def forget(self, client_id: str, topic_filter: str) -> None:
        filters = self.by_client.get(client_id)
        if filters is not None and topic_filter in filters:
            filters.remove(topic_filter)
            SUBSCRIPTIONS.dec()
            if not filters:
                del self.by_client[client_id]

    def filters_of(self, client_id: str) -> set[str]:
        return set(self.by_client.get(client_id, ()))

    def granted(self, client_id: str) -> list[tuple[str, int]]:
        """(filter, granted QoS) of each of the client's own subscriptions."""
        return [
            (topic_filter, next((q for s, q in self.get(topic_filter, ()) if s.client_id == client_id), 0))
            for topic_filter in self.filters_of(client_id)
        ]

    # --- routing ----------------------------------------------------------------------------------

    def matching_filters(self, topic: str) -> Iterator[str]:
        """Every subscribed filter that matches topic (exact first, then wildcards)."""
        if topic in self:
            yield topic
        if not self._wildcards:
            return
        levels = topic.split("/")
        dollar = topic.startswith("$")
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            hash_child = node.children.get("#")
            if hash_child is not None and hash_child.filter is not None and not (dollar and depth == 0):
                yield hash_child.filter  # '#' also matches the parent level itself
            if depth == len(levels):
                if node.filter is not None and node is not self._root:
                    yield node.filter
                continue
            exact = node.children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
            plus = node.children.get("+")
            if plus is not None and not (dollar and depth == 0):
                stack.append((plus, depth + 1))
