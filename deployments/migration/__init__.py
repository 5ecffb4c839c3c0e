"""Live migration of running requests between replicas: policy, planner, source, destination endpoint,
transports, relay.
"""
