"""Vertical partitioning: parties holding different columns of the same samples."""
