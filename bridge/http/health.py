"""Health and metrics routes (no authentication)."""

import os

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from bridge.http.context import Api
from mqchat import __version__

router = APIRouter()


def metrics_payload() -> bytes:
    """Prometheus text for this process, or for all mqchat processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


@router.get("/healthz", summary="Health: 200 when the bridge reaches the broker and every worker runs, else 503")
async def healthz(api: Api) -> JSONResponse:
    dead = api.dead_workers()
    if dead:
        body = {"status": "unhealthy", "dead_workers": dead, "version": __version__}
        return JSONResponse(body, status_code=503)
    if api.broker_connected():
        return JSONResponse({"status": "ok", "broker": "connected", "version": __version__})
    return JSONResponse({"status": "degraded", "broker": "disconnected", "version": __version__}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics() -> Response:
    return Response(metrics_payload(), media_type=CONTENT_TYPE_LATEST)
