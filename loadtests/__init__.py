"""Load tests, benchmarks and reliability runs against pdserve's OpenAI-compatible API.

- ``loadtests.locust``: the locust load test (``locustfile.py``), its workloads, streaming client, report and
  ``run_locust`` (the runner the other two use);
- ``loadtests.bench``: the goodput sweep (``python -m loadtests.bench``) and the other measurements;
- ``loadtests.reliability``: fuzzing, the soak, chaos and frozen-replica runs;
- ``loadtests.engines``: the engine replicas of a running server, asked through Serve (tools and tests/conftest.py).
"""
