"""Running the HTTP server (uvicorn with uvloop and httptools), plus the optional metrics port."""

from __future__ import annotations

import logging

import uvicorn
from prometheus_client import start_http_server

from service.http_app import create_app
from service.settings import ServerSettings

log = logging.getLogger("modelserve.server")


def uvicorn_config(settings: ServerSettings, app) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,  # one log line per inference costs more than the inference on small models
        timeout_keep_alive=30,
    )


def run_server(settings: ServerSettings) -> None:
    app = create_app(settings)
    config = uvicorn_config(settings, app)
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr=settings.http_host, registry=app.state.core.metrics.registry)
        log.info("metrics also on port %d", settings.metrics_port)
    uvicorn.Server(config).run()
