"""Turning a page's data into a response: the full HTML page, its htmx fragment (the
template's "content" block), or its JSON twin. Autoescaping is on: token text is untrusted."""

from __future__ import annotations

from functools import lru_cache

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template
from markupsafe import Markup, escape

from app import clamping, plots, urls
from app.config import ROOT
from app.fastpage import (
    bar,
    context,
    context_items,
    logit_table_rows,
    num,
    search_result_rows,
    tok,
    token_table_rows,
)
from app.tokens import chip_html, in_context, quoted, visible

TEMPLATES = ROOT / "templates"


def inline_code(text: str) -> Markup:
    """Prose with `command` spans (the method texts, written once for the README, the pages and
    the JSON) as HTML: escaped, each backticked span in <code>."""
    parts = str(escape(text)).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick stays as it is
        parts[-2:] = [parts[-2] + "`" + parts[-1]]
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


class _Environment(Environment):
    """Jinja's Environment, with each template's globals one plain dict: a copy of the
    environment's, which environment() fills before any template is loaded (Jinja asks that
    globals not change after that), instead of a ChainMap over them. On every {% from ... import %}
    Jinja compares the importing context's globals with the imported template's
    (Template._get_default_module); over a ChainMap's keys that took about 75 µs, half a
    millisecond of a neuron page's seven imports."""

    def make_globals(self, d):
        return {**self.globals, **(d or {})}


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = _Environment(
        loader=FileSystemLoader(TEMPLATES),
        # Templates are read once per process: checking every template's file for changes on each
        # render (Jinja's default) was 7% of a neuron page's server time (a stat per include).
        auto_reload=False,
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["visible"] = visible
    env.filters["chip"] = chip_html
    env.filters["in_context"] = in_context
    env.filters["quoted"] = quoted
    env.filters["inline_code"] = inline_code
    env.globals.update(urls.template_globals())
    # each plot drawn wide and narrow (phones): the stylesheet shows one
    env.globals["histogram_svg"] = plots.wide_and_narrow(plots.histogram_svg)
    env.globals["f1_curve_svg"] = plots.wide_and_narrow(plots.f1_curve_svg)
    env.globals["clamp_curve_svg"] = plots.wide_and_narrow(plots.clamp_curve_svg)
    env.globals["score_strip_svg"] = plots.wide_and_narrow(plots.score_strip_svg)
    env.globals["clamp_method"] = clamping.METHOD
    env.globals.update(tok=tok, num=num, bar=bar)  # token chips, numbers and bars: app/fastpage.py
    env.globals["context"] = context
    env.globals["context_items"] = context_items
    env.globals["search_result_rows"] = search_result_rows
    env.globals["token_table_rows"] = token_table_rows
    env.globals["logit_table_rows"] = logit_table_rows
    return env


def wants_fragment(request: Request) -> bool:
    """An htmx request gets the content block; a history restore needs the whole page."""
    return request.headers.get("HX-Request") == "true" and request.headers.get("HX-History-Restore-Request") != "true"


def media_type(request: Request) -> str:
    """The request body's media type, lowercased (media types are case-insensitive), "" if none."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def sends_json(request: Request) -> bool:
    """The request's body is JSON (application/json, or application/*+json)."""
    kind = media_type(request)
    return kind == "application/json" or kind.endswith("+json")


def render_block(template: Template, block: str, context: dict) -> str:
    return "".join(template.blocks[block](template.new_context(context)))


def render_html(request: Request, template_name: str, data: dict) -> str:
    template = environment().get_template(template_name)
    if not wants_fragment(request):
        return template.render(data)
    # htmx takes the document title from a top-level <title> in a fragment.
    title = render_block(template, "title", data)
    return f"<title>{title} · Needle</title>\n" + render_block(template, "content", data)


def json_response(data: dict, status: int = 200) -> JSONResponse:
    """A page's data as JSON: keys starting with "_" are for the templates only."""
    return JSONResponse({k: v for k, v in data.items() if not k.startswith("_")}, status_code=status)


def respond(request: Request, template_name: str, data: dict, fmt: str | None = None, status: int = 200) -> Response:
    """The page as JSON (fmt="json"), as a fragment (htmx request) or as a whole page."""
    if fmt == urls.JSON:
        return json_response(data, status)
    return HTMLResponse(render_html(request, template_name, data), status_code=status, headers={"Vary": "HX-Request"})


def render_partial(template_name: str, data: dict, headers: dict | None = None) -> HTMLResponse:
    """A partial template (_name.html) alone, for a panel that polls itself."""
    html = environment().get_template(template_name).render(data)
    return HTMLResponse(html, headers=headers)
