"""``GET /docs``: the OpenAPI document rendered as one self-contained page (no scripts, nothing
fetched from elsewhere, so it works on a closed network)."""

from __future__ import annotations

import json
from typing import Any

from flask import render_template_string

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ spec.info.title }} API {{ spec.info.version }}</title>
<style>
 body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 h2 { border-bottom: 1px solid #ddd; margin-top: 2.5rem; }
 .op { border: 1px solid #ddd; border-radius: 6px; margin: 1rem 0; padding: .5rem 1rem; }
 .method { display: inline-block; min-width: 4.5rem; font-weight: 700; text-transform: uppercase; }
 code, pre { font: 13px ui-monospace, monospace; background: #f6f6f6; }
 pre { padding: .5rem; overflow-x: auto; }
 td, th { text-align: left; padding: .2rem .8rem .2rem 0; vertical-align: top; }
</style>
</head>
<body>
<h1>{{ spec.info.title }} <small>{{ spec.info.version }}</small></h1>
<p>{{ spec.info.description }} The machine-readable document is at <a href="openapi.json"><code>/openapi.json</code></a>.</p>
<h2>Operations</h2>
{% for path, item in spec.paths.items() %}{% for method, op in item.items() %}
<div class="op" id="{{ op.operationId }}">
 <p><span class="method">{{ method }}</span> <code>{{ path }}</code> &mdash; {{ op.summary }}</p>
 {% if op.parameters %}<table><tr><th>parameter</th><th>in</th><th>schema</th><th></th></tr>
 {% for p in op.parameters %}<tr><td><code>{{ p.name }}</code></td><td>{{ p.in }}</td>
  <td><code>{{ p.schema | tojson }}</code></td><td>{{ p.description or "" }}</td></tr>{% endfor %}
 </table>{% endif %}
 {% if op.requestBody %}<p>Body:</p><ul>{% for media, body in op.requestBody.content.items() %}
  <li><code>{{ media }}</code>: {{ schema_link(body.schema) | safe }}</li>{% endfor %}</ul>{% endif %}
 <table><tr><th>status</th><th>meaning</th><th>body</th></tr>
 {% for status, response in op.responses.items() %}<tr><td>{{ status }}</td><td>{{ response.description }}</td>
  <td>{% for media, body in (response.content or {}).items() %}<code>{{ media }}</code> {{ schema_link(body.schema) | safe }}{% endfor %}</td></tr>{% endfor %}
 </table>
</div>
{% endfor %}{% endfor %}
<h2>Schemas</h2>
{% for name, schema in spec.components.schemas.items() %}
<h3 id="schema-{{ name }}">{{ name }}</h3>
<pre>{{ pretty(schema) }}</pre>
{% endfor %}
</body>
</html>
"""


def _schema_link(schema: dict[str, Any]) -> str:
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        name = ref.rsplit("/", 1)[1]
        return f'<a href="#schema-{name}">{name}</a>'
    return "<details><summary>schema</summary><pre>" + _escape(json.dumps(schema, indent=2)) + "</pre></details>"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_docs(spec: dict[str, Any]) -> str:
    return render_template_string(
        _PAGE, spec=spec, schema_link=_schema_link, pretty=lambda value: json.dumps(value, indent=2)
    )
