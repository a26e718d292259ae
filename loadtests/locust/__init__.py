"""The locust load test of pdserve's OpenAI-compatible API and what it needs: ``locustfile.py`` (run it with
``.venv/bin/locust -f loadtests/locust/locustfile.py ...``), the workload profiles (``workloads.py``), one timed
streaming request (``stream.py``), the report and its plots (``report.py``, ``plots.py``), ``run_locust`` in
``runner.py`` (one headless run as a subprocess, for the sweeps and runs of ``loadtests.bench`` and
``loadtests.reliability``), and a stand-in streaming API without engines to try or test all of it
(``python -m loadtests.locust.fake_server``). See docs/loadtests.md.
"""
