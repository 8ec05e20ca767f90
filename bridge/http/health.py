"""Health and metrics routes (no authentication)."""

import os
from collections.abc import Iterable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from bridge.http.context import Api
from mqchat import __version__

router = APIRouter()


NODE_LABEL = "node"


class _NodeLabelled(Collector):
    """Every sample of another registry with the node's label added (a cluster's nodes answer
    /metrics each; a dashboard tells them apart without scrape-side relabelling)."""

    def __init__(self, source: CollectorRegistry, node: str) -> None:
        self._source = source
        self._node = node

    def collect(self) -> Iterable[Metric]:
        for family in self._source.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, NODE_LABEL: self._node}) for s in family.samples]
            yield labelled


def metrics_payload(node: str = "") -> bytes:
    """Prometheus text for this process, or for all mqchat processes in multiprocess mode; with
    node, every sample labelled ``node="…"``."""
    source: CollectorRegistry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        source = CollectorRegistry()
        multiprocess.MultiProcessCollector(source)  # type: ignore[no-untyped-call]
    if not node:
        return generate_latest(source)
    labelled = CollectorRegistry(auto_describe=False)
    labelled.register(_NodeLabelled(source, node))
    return generate_latest(labelled)


@router.get("/healthz", summary="Health: 200 when the bridge reaches the broker and every worker runs, else 503")
async def healthz(api: Api) -> JSONResponse:
    node = {"node": api.node} if api.node else {}
    dead = api.dead_workers()
    if dead:
        body = {"status": "unhealthy", "dead_workers": dead, "version": __version__, **node}
        return JSONResponse(body, status_code=503)
    if api.broker_connected():
        return JSONResponse({"status": "ok", "broker": "connected", "version": __version__, **node})
    body = {"status": "degraded", "broker": "disconnected", "version": __version__, **node}
    return JSONResponse(body, status_code=503)


@router.get("/metrics", summary="Prometheus metrics (each sample labelled with this node)", response_class=Response)
async def prometheus_metrics(api: Api) -> Response:
    return Response(metrics_payload(api.node), media_type=CONTENT_TYPE_LATEST)
