"""vip-agent: run VIP pipelines unattended on datasets dropped in a folder."""

__version__ = "0.1.0"
