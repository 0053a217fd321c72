"""Measurements of a sub-network: exact MACs and params (closed form), latency, size, accuracy."""
