"""A local, VIP-compatible REST server (CARMIN dialect) with real local pipelines.

``LocalVip`` serves ``/rest/...`` like the VIP portal, runs Boutiques pipelines
as local subprocesses and can inject faults (``FaultSpec``). See README.md.
"""

from agent.localvip.faults import FaultSpec
from agent.localvip.server import LocalVip

__all__ = ["FaultSpec", "LocalVip"]
