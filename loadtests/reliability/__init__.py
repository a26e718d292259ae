"""Reliability runs against a running server (``make run``), results in docs/reliability.md: OpenAPI-driven
fuzzing (``python -m loadtests.reliability.fuzz``; ``make fuzz``), a soak of steady load with disconnects and bad
requests, then leak checks (``python -m loadtests.reliability.soak``; ``make soak``), faults on a local multi-node
cluster it starts itself (``python -m loadtests.reliability.chaos``; ``make chaos``), and what a frozen prefill or
decode replica costs (``python -m loadtests.reliability.frozen_replica``).
"""
