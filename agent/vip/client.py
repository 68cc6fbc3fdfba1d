"""HTTP client for VIP's REST API (CARMIN dialect as VIP implements it).

See docs/vip-rest.md (VIP-portal 4.x behaviour) and docs/server-behaviour.md for what this
client copes with. The client knows HTTP, paths, transfers, pipelines and executions; it knows
nothing about datasets. It is built in layers, one job per module:

- :mod:`agent.vip.watchdog` and :mod:`agent.vip.connections`: deadlines, connections a
  deadline can cut, bodies sent in large blocks; :mod:`agent.vip.smallput` for small files;
- :mod:`agent.vip.answers`: VIP's answers -> typed errors, strict shape checks;
- :mod:`agent.vip.transport`: the session, retries, redirects, the server's budget;
- :mod:`agent.vip.endpoints`: platform, paths, pipelines, executions;
- :mod:`agent.vip.transfers`: uploads and downloads.

Deadlines: every request has a connect timeout, a read timeout (per socket read) and an
overall deadline enforced by a watchdog thread that shuts the socket down, so a server that
drip-feeds bytes or never finishes its answer cannot hold a caller forever. Transfers have no
overall deadline but a minimum-progress rule: at least ``transfer_min_bytes`` every
``transfer_window`` seconds, else the transfer is abandoned (and retried).

Strict answers: a 2xx whose body is a VIP error object, or is not what the endpoint returns,
raises a typed error (:class:`ProtocolError` unless the code says more) with the raw answer in
its ``detail``.

Security: the API key is attached by a ``requests`` auth hook as the ``apikey`` header. It is
never put in a URL, a log line, an exception, or ``repr``. ``requests`` never follows a
redirect (it would copy the header to the target); the transport follows one only to the same
host over https, and never sends the key over plain http to a server it has not checked.
"""

from __future__ import annotations

from agent.vip.connections import Progress
from agent.vip.endpoints import encode_path, encode_pipeline_id
from agent.vip.transfers import _Transfers
from agent.vip.watchdog import _WATCHDOG, _Guard

__all__ = ["VipClient", "Progress", "encode_path", "encode_pipeline_id", "_WATCHDOG", "_Guard"]


class VipClient(_Transfers):
    """Typed client for one VIP portal.

    ``base_url`` is the portal URL (``https://vip.creatis.insa-lyon.fr`` or
    ``http://127.0.0.1:43127``; any spelling :func:`agent.vip.urls.normalise_server` accepts);
    the REST root is ``base_url + "/rest/"``. Idempotent calls are
    retried ``retries`` times on :class:`TransientError` with the ``retry`` wait policy
    (:mod:`agent.pacer`) starting at ``backoff`` seconds; ``POST /executions`` never is.

    Time limits: ``connect_timeout`` (default ``min(timeout, 15)``) to open a connection,
    ``timeout`` for each socket read, ``deadline`` (default ``5 * timeout``) for a whole
    request and its answer; transfers instead must move ``transfer_min_bytes`` every
    ``transfer_window`` seconds (default ``2 * timeout``). ``results_timeout`` is the read
    timeout of ``GET /executions/{id}/results``, which VIP computes slowly.

    Every request takes a token from the server's budget (:func:`agent.pacer.budget_for`),
    every transfer holds one of its transfer slots.
    """

    def redact(self, text: str) -> str:
        """``text`` without this client's API key (a job's log quoted to users)."""
        return self._scrub(text)
