"""Examples of using shoal from outside the package (a user strategy, a torchrun loop)."""
