"""One module per ``vip-agent`` command."""
