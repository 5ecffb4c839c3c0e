"""Cluster-wide pieces: the ClusterController actor, the KV-headroom request router, autoscaling, TP worker
placement, and placement/addresses across nodes (placement.py).
"""
