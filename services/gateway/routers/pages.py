"""Probes, Prometheus metrics and the chat page."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import error_body
from ..schemas import Health, NotReady, Readiness
from ..state import State

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["probes"])
async def healthz() -> Health:
    """The process is up (liveness)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    tags=["probes"],
    responses={503: {"model": NotReady, "description": "A backend or the store is not ready"}},
)
async def readyz(state: State):
    """Ready only when the policy and reward services report SERVING and the store answers."""
    try:
        statuses = await asyncio.wait_for(state.backends.health(), timeout=5.0)
    except Exception as e:  # noqa: BLE001 -- a failing health check means not ready, never a 500
        statuses = {"policy": f"UNKNOWN ({type(e).__name__})", "reward": "UNKNOWN"}
    try:
        await state.storage.ping()
        store_status = "ok"
    except Exception as e:  # noqa: BLE001 -- reported in the body
        store_status = f"error: {type(e).__name__}"
    down = [f"{k} ({v})" for k, v in statuses.items() if v != "SERVING"]
    if store_status != "ok":
        down.append(f"store ({store_status})")
    if down:
        body = error_body(503, "not ready: " + ", ".join(down) + " not serving", "service_unavailable")
        body.update(backends=statuses, store=store_status)
        return JSONResponse(body, status_code=503)
    return Readiness(status="ready", backends=statuses, store=store_status)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    """The page's icon (an SVG, which browsers accept under the conventional name)."""
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})
