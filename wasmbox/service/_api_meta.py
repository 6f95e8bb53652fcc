"""Internal: the HTTP API's own pages: offline Swagger UI, liveness, Prometheus metrics."""

from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from wasmbox.service.metrics import CONTENT_TYPE, ServiceMetrics

# The Swagger UI assets, served from the installed package (never from a CDN).
_DOCS_ASSETS = "/docs/assets"


def mount_docs_assets(app: FastAPI) -> None:
    """Serve the Swagger UI assets from the installed package."""
    app.mount(_DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")


def add_meta_routes(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Add ``/docs``, ``/healthz`` and ``/metrics`` to `app`."""

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        """Swagger UI, entirely from this service (works offline)."""
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{_DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{_DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{_DOCS_ASSETS}/favicon-32x32.png",
        )

    @app.get("/healthz")
    def health() -> dict[str, str]:
        """Liveness."""
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {}}}})
    def prometheus() -> Response:
        """Prometheus metrics."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)
