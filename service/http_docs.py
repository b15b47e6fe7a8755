"""The `/docs` page, offline: Swagger UI served from the installed `swagger-ui-bundle` package (no CDN), and an
OpenAPI document that lists only the responses the server really gives.

FastAPI's default page loads Swagger UI from cdn.jsdelivr.net, so on an air-gapped machine /docs was blank.
FastAPI also documents a 422 on every route with parameters; this server answers validation problems with 400
(service/http_app.py), so those 422 entries are removed.
"""

from __future__ import annotations

from typing import Any

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS = "/docs/assets"
_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_docs(app: FastAPI) -> None:
    """Serve /docs (and its assets) locally; create the app with docs_url=None and redoc_url=None."""
    app.mount(ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger-ui-assets")
    title = f"{app.title} - API"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=title,
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
                                   oauth2_redirect_url="/docs/oauth2-redirect")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    base = app.openapi

    def openapi() -> dict[str, Any]:
        return drop_validation_responses(base())

    app.openapi = openapi  # type: ignore[method-assign]


def drop_validation_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Remove FastAPI's default 422 from every operation (and its then unused schemas); idempotent."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in _VALIDATION_SCHEMAS:
        components.pop(name, None)
    return schema
