"""The viewer pages under ``/ui/``: features, a feature page, the audit playground and live alerts.

Pages are rendered on the server from the sidecar's loaded state (library,
SAE, policies) and the feature index; the playground and the alerts page call
the JSON API (``/v1/audit``, ``/v1/generate``, ``/v1/alerts``,
``/v1/alerts/stream``) from a little JavaScript. Nothing is fetched from
outside the sidecar: the pages carry a Content-Security-Policy that allows
only this origin.

Example::

    app = create_app(settings)
    mount_viewer(app)                      # or app.include_router(viewer.router())
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from auditor.errors import AuditorError
from auditor.viewer.index import SAE_FINGERPRINT, FeatureIndex, index_path_for, load_index, sae_fingerprint

__all__ = ["router", "mount_viewer", "CSP", "LEVELS"]

_log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_STATIC = _HERE / "static"
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}

#: Only this origin: no CDN, no external fonts, no inline script.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

LEVELS = 8
"""Heat-map intensity levels (CSS classes ``lv0`` .. ``lv8``)."""

_PAGE = 50  # latents per page in the all-latents table

# ASCII digits only: str.isdigit() and int() also take other scripts' digits ("٣", "３"),
# and isdigit() takes "²", which int() then rejects.
_LATENT_ID = re.compile(r"[0-9]+")


def _latent_number(text: str) -> int | None:
    """The latent index ``text`` spells in ASCII digits, or None when it is not one."""
    return int(text) if _LATENT_ID.fullmatch(text) else None


def level(value: float, top: float) -> int:
    """Heat level 0..LEVELS of ``value`` relative to ``top`` (0 for inactive tokens, at least 1 when active)."""
    if value <= 0 or top <= 0:
        return 0
    return max(1, min(LEVELS, math.ceil(LEVELS * value / top)))


@dataclass
class _IndexCache:
    path: Path | None = None
    mtime: float = -1.0
    sae: Any = None
    """The SAE the index was checked against."""
    index: FeatureIndex | None = None
    error: str | None = None
    note: str | None = None
    """Shown beside a usable index (one written before SAE fingerprints)."""


class _Viewer:
    """Per-router state: where the index is and the last one loaded."""

    def __init__(self, index_path: str | os.PathLike[str] | None) -> None:
        self.index_path = Path(index_path) if index_path is not None else None
        self.templates = Jinja2Templates(directory=str(_HERE / "templates"))
        self.templates.env.globals["level"] = level
        self.templates.env.filters["pct"] = _pct
        self.templates.env.filters["num"] = _num
        self._cache = _IndexCache()
        self._lock = threading.Lock()
        self._fingerprint: tuple[Any, str] | None = None  # (SAE, its sae_fingerprint)

    def index(self, rt: Any) -> tuple[FeatureIndex | None, str | None, str | None]:
        """The feature index for the loaded SAE (reloaded when the file changes) or why there is none,
        and a note to show beside it."""
        path = self.index_path
        lib = rt.auditor.library
        if path is None:
            if lib is None or lib.path is None:
                return None, "no feature library is loaded, so there is no default index file", None
            path = index_path_for(lib)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None, f"no feature index at {path}; build one with `auditor index-features --corpus FILE.jsonl`", None
        sae = rt.auditor.sae
        with self._lock:
            c = self._cache
            if c.path != path or c.mtime != mtime or c.sae is not sae:
                self._cache = c = self._load(path, mtime, sae)
            return c.index, c.error, c.note

    def _load(self, path: Path, mtime: float, sae: Any) -> _IndexCache:
        """Read the index and check it was built from ``sae``.

        An index of other weights is refused, not shown with a warning: its contexts and
        statistics would sit under this SAE's latent numbers, look plausible and be wrong,
        and nothing on the page could tell them apart. The sidecar keeps serving (audits do
        not read the index); the pages say why and how to fix it, and the log says it once.
        """
        try:
            idx = load_index(path)
        except AuditorError as exc:
            return _IndexCache(path, mtime, sae, None, exc.message)
        d_sae = sae.cfg.d_sae
        if idx.d_sae != d_sae:
            error = f"{path}: the index has {idx.d_sae} latents but the SAE has {d_sae}; rebuild it"
            _log.warning("feature index not shown: %s", error)
            return _IndexCache(path, mtime, sae, None, error)
        stored = idx.meta.get(SAE_FINGERPRINT)
        if stored is None:
            note = (
                "This index does not record which SAE weights it was built from (it predates SAE fingerprints), "
                "so it is matched to the loaded SAE by width only; rebuild it with `auditor index-features --restart` "
                "to have it checked."
            )
            _log.info("%s: %s", path, note)
            return _IndexCache(path, mtime, sae, idx, None, note)
        mine = self._sae_fingerprint(sae)
        if stored != mine:
            error = (
                f"{path} was built from another SAE ({idx.meta.get('sae')!r}, weights sha256 {stored[:12]}) than the "
                f"one loaded (sha256 {mine[:12]}), so its contexts and statistics are not this SAE's. Index this SAE "
                f"with `auditor index-features --corpus FILE.jsonl --sae PATH --out FILE` and serve it with "
                f"--viewer-index FILE, or serve the SAE the index was built from."
            )
            _log.warning("feature index not shown: %s", error)
            return _IndexCache(path, mtime, sae, None, error)
        return _IndexCache(path, mtime, sae, idx)

    def _sae_fingerprint(self, sae: Any) -> str:
        """:func:`sae_fingerprint` of ``sae``, computed once per loaded SAE (under the index lock)."""
        if self._fingerprint is None or self._fingerprint[0] is not sae:
            self._fingerprint = (sae, sae_fingerprint(sae))
        return self._fingerprint[1]

    def render(self, request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
        state = request.app.state.auditor
        rt = state.runtime
        settings = state.settings
        base = {
            "nav": name.split(".")[0],
            "signed_in": settings.api_token is not None and settings.auth_all_routes and name != "login.html",
            "model": rt.auditor.model.name if rt is not None else None,
            "sae": rt.sae_name if rt is not None else None,
            "library": rt.auditor.library.id if rt is not None and rt.auditor.library is not None else None,
        }
        return self.templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status, headers=_HEADERS)

    def loading(self, request: Request) -> Response:
        state = request.app.state.auditor
        return self.render(request, "loading.html", status=503, error=state.load_error)


def _pct(value: float) -> str:
    if value == 0:
        return "0%"
    if value < 0.0001:
        return "<0.01%"
    return f"{100 * value:.2f}%"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}"


def router(*, index_path: str | os.PathLike[str] | None = None) -> APIRouter:
    """The ``/ui`` pages. ``index_path``: feature index file (default: beside the loaded library)."""
    v = _Viewer(index_path)
    r = APIRouter(prefix="/ui", include_in_schema=False)

    @r.get("", response_class=HTMLResponse)
    @r.get("/", response_class=HTMLResponse)
    def home() -> Response:
        return RedirectResponse("/ui/features", status_code=307)

    @r.get("/static/{name}")
    def static(name: str) -> Response:
        path = _STATIC / name
        # Only plain files that sit directly in static/ (no separators, no dot files).
        if "/" in name or "\\" in name or name.startswith(".") or path.suffix not in _STATIC_TYPES or not path.is_file():
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type=_STATIC_TYPES[path.suffix], headers={"Cache-Control": "no-cache", **_HEADERS})

    @r.get("/features", response_class=HTMLResponse)
    def features(
        request: Request, q: str = "", category: str = "", sort: str = "index", page: int = 1, latent: str = ""
    ) -> Response:
        rt = request.app.state.auditor.runtime
        if rt is None:
            return v.loading(request)
        d_sae = rt.auditor.sae.cfg.d_sae
        if latent.strip():
            n = _latent_number(latent.strip().removeprefix("#"))
            if n is not None and n < d_sae:
                return RedirectResponse(f"/ui/features/{n}", status_code=303)
        lib = rt.auditor.library
        found = lib.search(q or None, category or None) if lib is not None else []
        index, index_error, index_note = v.index(rt)
        rows = []
        dens = index.densities() if index is not None else None
        for f in found:
            rows.append(
                {
                    "feature": f,
                    "density": float(dens[f.index]) if dens is not None and f.index < len(dens) else None,
                    "max": float(index.max_act[f.index]) if index is not None and f.index < index.d_sae else None,
                }
            )
        all_rows, pages = _all_latents(index, lib, sort, page)
        return v.render(
            request,
            "features.html",
            q=q,
            category=category,
            categories=lib.categories if lib is not None else [],
            rows=rows,
            total=len(lib.features) if lib is not None else 0,
            d_sae=d_sae,
            latent=latent,
            latent_error=f"latent must be a number from 0 to {d_sae - 1}" if latent.strip() else None,
            index=index,
            index_error=index_error,
            index_note=index_note,
            all_rows=all_rows,
            sort=sort if sort in ("index", "density", "max") else "index",
            page=max(1, min(page, pages)),
            pages=pages,
        )

    @r.get("/features/{latent}", response_class=HTMLResponse)
    def feature(request: Request, latent: str) -> Response:
        rt = request.app.state.auditor.runtime
        if rt is None:
            return v.loading(request)
        lib = rt.auditor.library
        d_sae = rt.auditor.sae.cfg.d_sae
        number = _latent_number(latent)
        if number is None and lib is not None and lib.has(latent):
            return RedirectResponse(f"/ui/features/{lib.feature(latent).index}", status_code=307)
        n = -1 if number is None else number
        if not 0 <= n < d_sae:
            hint = lib.unknown_feature_message(latent) if lib is not None and number is None else f"latents are 0 to {d_sae - 1}"
            return v.render(request, "missing.html", status=404, what=latent, hint=hint)
        labelled = None
        if lib is not None:
            name = lib.name_for_index(n)
            labelled = lib.feature(name) if name is not None else None
        index, index_error, index_note = v.index(rt)
        summary = index.latent(n) if index is not None else None
        return v.render(
            request,
            "feature.html",
            n=n,
            d_sae=d_sae,
            f=labelled,
            s=summary,
            index=index,
            index_error=index_error,
            index_note=index_note,
            hist=_histogram_svg(summary.histogram) if summary is not None else None,
            uses=_policies_using(rt, n),
        )

    @r.get("/playground", response_class=HTMLResponse)
    def playground(request: Request, feature: str = "") -> Response:
        rt = request.app.state.auditor.runtime
        if rt is None:
            return v.loading(request)
        lib = rt.auditor.library
        policies = rt.store.names if rt.store is not None else []
        default = rt.store.current().name if rt.store is not None else None
        return v.render(
            request,
            "playground.html",
            policies=policies,
            default_policy=default,
            features=lib.features if lib is not None else [],
            feature=feature,
            needs_token=rt.settings.api_token is not None,
            max_generate=rt.settings.max_generate_tokens,
        )

    @r.post("/api/activations")
    async def activations(request: Request) -> Response:
        """Per-token activations of chosen latents on one input (the playground's heat map).

        Body: one audit input (``text`` | ``messages`` | ``prompt`` [+ ``completion``]) and
        ``latents`` (up to 32 indices). Answers the content tokens (``position``, ``token``)
        and, per latent, its activation on each of them.
        """
        from fastapi.responses import JSONResponse

        rt = request.app.state.auditor.runtime
        if rt is None:
            return JSONResponse(_error("the model and policies are still loading; retry shortly", "not_ready"), status_code=503)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse(_error("the body must be a JSON object", "invalid_request"), status_code=422)
        try:
            item, latents = _activation_request(body, rt.auditor.sae.cfg.d_sae)
        except AuditorError as exc:
            return JSONResponse(_error(exc.message, "invalid_request"), status_code=422)
        out = await rt.batcher.run_model(_latent_activations, rt.auditor, item, latents, rt.settings.max_tokens)
        return JSONResponse(out)

    @r.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/ui/features") -> Response:  # noqa: A002 - the query name
        return v.render(request, "login.html", next=_safe_next(next), error=None)

    @r.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        """Check the API token (form field ``token``) and set the viewer session cookie."""
        from urllib.parse import parse_qs

        from auditor.server.auth import SESSION_COOKIE, SESSION_TTL_S, session_value, token_matches

        settings = request.app.state.auditor.settings
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        target = _safe_next((form.get("next") or ["/ui/features"])[0])
        expected = session_value(settings)
        if expected is None:  # no token configured: nothing to sign in to
            return RedirectResponse(target, status_code=303)
        if not token_matches(settings, (form.get("token") or [""])[0]):
            return v.render(
                request, "login.html", status=401, next=target,
                error="That is not this server's API token (AUDITOR_API_TOKEN); check it and try again.",
            )
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            expected,
            max_age=SESSION_TTL_S,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return resp

    @r.post("/logout")
    def logout() -> Response:
        from auditor.server.auth import SESSION_COOKIE

        resp = RedirectResponse("/ui/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @r.get("/alerts", response_class=HTMLResponse)
    def alerts(request: Request) -> Response:
        rt = request.app.state.auditor.runtime
        if rt is None:
            return v.loading(request)
        return v.render(request, "alerts.html")

    return r


def mount_viewer(app: Any, *, index_path: str | os.PathLike[str] | None = None) -> Any:
    """Serve the viewer pages on ``app`` under ``/ui``; returns their router."""
    pages = router(index_path=index_path)
    app.include_router(pages)
    return pages


def _safe_next(target: str) -> str:
    """Where to go after signing in: a viewer path on this server, nothing else (no open redirect)."""
    if target.startswith("/ui/") and not target.startswith("/ui/login") and "\\" not in target and "//" not in target:
        return target
    return "/ui/features"


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}}


_MAX_LATENTS = 32


def _activation_request(body: Any, d_sae: int) -> tuple[Any, list[int]]:
    """Validate ``/ui/api/activations``: an audit input plus ``latents``."""
    from auditor.errors import ConfigError
    from auditor.text import parse_input

    if not isinstance(body, dict):
        raise ConfigError("the body must be a JSON object with an input and 'latents'")
    latents = body.get("latents")
    if (
        not isinstance(latents, list)
        or not 1 <= len(latents) <= _MAX_LATENTS
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < d_sae for i in latents)
    ):
        raise ConfigError(f"'latents' must be a list of 1 to {_MAX_LATENTS} latent indices in 0..{d_sae - 1}")
    item = parse_input({k: v for k, v in body.items() if k != "latents"}, where="body")
    return item, list(dict.fromkeys(latents))


def _latent_activations(auditor: Any, item: Any, latents: list[int], max_tokens: int) -> dict[str, Any]:
    """Run the model to the hookpoint and encode only ``latents`` on the content tokens."""
    import torch

    from auditor.text import tokenize_batch

    batch = tokenize_batch(auditor.model.tokenizer, [item], max_tokens=max_tokens)
    acts = auditor.activations(batch)  # [1, T, d_in]
    mask = batch.content_mask.to(acts.device)  # [1, T]
    with torch.inference_mode():
        feats = auditor.sae.encode(acts[mask], features=latents)  # [N, len(latents)]
    positions = mask[0].nonzero().flatten().tolist()
    return {
        "tokens": [{"position": p, "token": batch.tokens[0][p]} for p in positions],
        "latents": {str(i): [round(v, 4) for v in feats[:, k].tolist()] for k, i in enumerate(latents)},
        "truncated": batch.truncated[0],
    }


def _all_latents(index: FeatureIndex | None, lib: Any, sort: str, page: int) -> tuple[list[dict[str, Any]], int]:
    """One page of every latent in the index, by index, density or maximum activation."""
    if index is None:
        return [], 1
    import torch

    d = index.d_sae
    pages = max(1, math.ceil(d / _PAGE))
    page = max(1, min(page, pages))
    if sort == "density":
        order = torch.sort(index.active, descending=True, stable=True).indices
    elif sort == "max":
        order = torch.sort(index.max_act, descending=True, stable=True).indices
    else:
        order = torch.arange(d)
    ids = order[(page - 1) * _PAGE : page * _PAGE].tolist()
    dens = index.densities()
    rows = []
    for i in ids:
        top = index.top_tokens[i, 0]
        peak = int(top[index.config.before]) if index.config.before < top.numel() else -1
        rows.append(
            {
                "index": i,
                "name": lib.name_for_index(i) if lib is not None else None,
                "density": float(dens[i]),
                "max": float(index.max_act[i]),
                "peak": index.token_text.get(peak, "") if peak >= 0 else "",
            }
        )
    return rows, pages


def _histogram_svg(hist: list[tuple[float, float, int]]) -> dict[str, Any] | None:
    """Bar geometry for an inline SVG histogram (log-scaled counts)."""
    if not hist:
        return None
    width, height = 600.0, 140.0
    top = max(math.log1p(c) for _, _, c in hist) or 1.0
    bar = width / len(hist)
    bars = []
    for k, (lo, hi, c) in enumerate(hist):
        h = height * math.log1p(c) / top
        bars.append({"x": round(k * bar, 2), "w": round(max(bar - 1, 1), 2), "y": round(height - h, 2), "h": round(h, 2), "lo": lo, "hi": hi, "count": c})
    return {"width": width, "height": height, "bars": bars, "lo": hist[0][0], "hi": hist[-1][1]}


def _policies_using(rt: Any, latent: int) -> list[dict[str, Any]]:
    """Rules (per loaded policy) whose condition or steering reads ``latent``."""
    if rt.store is None:
        return []
    out = []
    for name, engine in rt.store.engines.items():
        compiled = engine.compiled
        for rule in compiled.rules:
            reads = {lat for i in rule.leaves for lat in compiled.leaves[i].latents}
            steers = {s.index for s in rule.steering}
            if latent in reads or latent in steers:
                out.append(
                    {
                        "policy": name,
                        "rule": rule.id,
                        "severity": rule.severity,
                        "actions": ", ".join(rule.actions),
                        "how": "condition and steering" if latent in reads and latent in steers else ("condition" if latent in reads else "steering"),
                        "description": rule.description,
                    }
                )
    return out
