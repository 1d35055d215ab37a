"""Periodic data parallel: local SGD and DiLoCo, streaming or not (see :mod:`.strategy`)."""
