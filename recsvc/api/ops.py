"""Operator endpoints outside the OpenAPI resources: Prometheus /metrics and the /docs page."""

from __future__ import annotations

from flask import Flask, Response, current_app

from recsvc import metrics

# A self-contained page that renders /openapi.json in the browser: no CDN, no assets to package.
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>recsvc API</title>
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ccc;margin-top:2rem}
.op{margin:1rem 0;padding:.5rem 1rem;background:#f6f8fa;border-radius:6px}
.m{display:inline-block;min-width:4rem;font-weight:bold}.GET{color:#0a6}.POST{color:#06c}
code,pre{background:#eef;padding:0 .2rem}pre{padding:.5rem;overflow:auto}td,th{text-align:left;padding:.1rem .6rem}
</style></head><body>
<h1 id="title">recsvc API</h1>
<p>Machine-readable document: <a href="openapi.json">openapi.json</a>.
Everything under <code>/v1</code> needs <code>Authorization: Bearer &lt;key&gt;</code>;
<code>/v1/admin</code> needs an admin key. Errors are always
<code>{"error": {"code", "message", "details"}}</code>.</p>
<div id="api">Loading&hellip;</div>
<script>
const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const ref = (spec, s) => s && s.$ref ? spec.components.schemas[s.$ref.split("/").pop()] : s;
function fields(spec, schema) {
  schema = ref(spec, schema) || {};
  const rows = Object.entries(schema.properties || {}).map(([n, p]) => {
    const r = ref(spec, p.items || p) || {};
    const type = p.$ref ? p.$ref.split("/").pop()
      : (p.type || "") + (p.items ? " of " + (r.type || (p.items.$ref || "").split("/").pop()) : "");
    return `<tr><td><code>${esc(n)}</code></td><td>${esc(type)}</td><td>${esc(p.description)}</td></tr>`;
  });
  return rows.length ? `<table>${rows.join("")}</table>` : "";
}
function operation(spec, path, method, op) {
  const params = (op.parameters || []).map(p =>
    `<tr><td><code>${esc(p.name)}</code></td><td>${esc(p.in)}</td><td>${esc(p.description)}</td></tr>`).join("");
  const body = op.requestBody ? fields(spec, op.requestBody.content["application/json"].schema) : "";
  const ok = (op.responses || {})["200"];
  const out = ok && ok.content ? fields(spec, ok.content["application/json"].schema) : "";
  const name = method.toUpperCase();
  return `<div class="op"><span class="m ${name}">${name}</span><code>${esc(path)}</code>
    <p>${esc(op.summary)} ${esc(op.description)}</p>
    ${params ? "<h4>Parameters</h4><table>" + params + "</table>" : ""}
    ${body ? "<h4>Body</h4>" + body : ""}${out ? "<h4>Response</h4>" + out : ""}
    <p>Statuses: ${Object.keys(op.responses || {}).join(", ")}</p></div>`;
}
fetch("openapi.json").then(r => r.json()).then(spec => {
  document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
  const html = Object.entries(spec.paths).map(([path, ops]) =>
    Object.entries(ops).filter(([m]) => m !== "parameters").map(([m, op]) => operation(spec, path, m, op)).join(""));
  document.getElementById("api").innerHTML = html.join("");
}).catch(e => { document.getElementById("api").textContent = "Could not load openapi.json: " + e; });
</script></body></html>
"""


def metrics_view() -> Response:
    """Prometheus text format; no key needed (keep the port off the public network)."""
    service = current_app.extensions["recsvc"]
    metrics.model_tick(service.store.created_at)
    service.cache.publish_size()
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


def docs_view() -> Response:
    return Response(DOCS_PAGE, mimetype="text/html")


def init_app(app: Flask) -> None:
    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
    app.add_url_rule("/docs", "docs", docs_view, methods=["GET"])
