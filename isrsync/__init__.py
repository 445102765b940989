"""isrsync: Internet Suspend/Resume for QEMU guests."""

__version__ = "0.1.0"
