"""Distributed mode on NATS JetStream (``[cluster] backend = "nats"``).

Gateways (the ZMQ front door) admit requests into a work-queue stream and relay events;
workers pull requests, render them through the same pipeline as the single process, and
store each terminal event create-only, so the first one stored is the only one published.
Everything here imports nats-py; nothing outside this package does, and the service loads
it only when a cluster is configured.
"""
