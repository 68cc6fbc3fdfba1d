"""The status page of ``vip-agent watch``: a live page, its JSON API and ``/metrics``.

Built on the standard library's ``ThreadingHTTPServer`` (no framework: a handful of
routes, and every security rule is easier to see in plain code). The page, its script
and its style ship as package data (``agent/web/static``); nothing comes from a CDN.

Security (docs/monitoring.md):

* it listens on loopback unless configured otherwise;
* every request whose ``Host`` is not one of the configured names is refused (DNS
  rebinding: a hostile site resolving its own name to 127.0.0.1);
* actions (POST) need ``Authorization: Bearer <token>``, the token being in
  ``<state>/http-token`` (mode 0600); the page sends it from script, which a foreign
  site cannot do (no cookies, no CORS), and a POST whose ``Origin`` is foreign is refused;
* reading is open from loopback unless ``read_token: true``; from elsewhere it needs the token;
* a strict Content-Security-Policy (scripts and styles from this server only);
* the API key is never part of anything it serves (the journal never holds it).
"""

from agent.web.server import StatusServer, StatusSource, ensure_token

__all__ = ["StatusServer", "StatusSource", "ensure_token"]
