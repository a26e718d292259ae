"""Benchmarks against a running or self-started server, results in docs/benchmarks.md: the goodput sweep of
every setup (``python -m loadtests.bench``, ``sweep.py``; ``make bench``) with Ray Serve LLM as its peer
(``peer.py``), the serving overhead against vLLM's own server (``python -m loadtests.bench.overhead``; ``make
bench-overhead``), compiled vs eager engines (``python -m loadtests.bench.compile_choice``; ``make bench-compile``),
where the CPU goes under load (``cpu_profile``), decode routing policies (``policy_bench``), what local prefill
costs a list prompt (``list_prompt_cost``), and the same prompts through ``vllm bench serve`` (``crosscheck``).
"""
