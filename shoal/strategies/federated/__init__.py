"""Federated learning: FedAvg and its family over clients that keep their data."""
