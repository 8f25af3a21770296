"""ckpt: incremental checkpoint/restore and live migration of Linux processes."""

__version__ = "0.1.0"
