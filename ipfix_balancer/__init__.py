"""fast_ipfix_balancer: pass DPI IPFIX export on to collectors message by message."""

__version__ = "0.1.0"
