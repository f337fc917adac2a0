"""Sphinx extension: write each inline ``<script>`` of a page once.

Sphinx 7.4 registers an inline script that an extension adds after the builder started (as
``sphinx-thebe`` and ``sphinx-togglebutton`` do) twice: once as ``_JavaScript(None, body=...)``
and again, before writing, as ``_JavaScript('', body=...)``, which do not compare equal. The
page then declares ``const THEBE_JS_URL`` twice and the browser reports
"SyntaxError: Identifier 'THEBE_JS_URL' has already been declared". This keeps the first of
each script with the same file name, attributes and body.
"""
from __future__ import annotations


def _drop_repeated_scripts(app, pagename, templatename, context, doctree) -> None:
    seen = set()
    unique = []
    for script in context.get("script_files", []):
        attributes = getattr(script, "attributes", {})
        key = (getattr(script, "filename", None) or "", tuple(sorted(attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    # Run after every other handler, so scripts they add to this page are seen too.
    app.connect("html-page-context", _drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
