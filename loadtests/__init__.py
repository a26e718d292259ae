"""Load tests of pdserve's OpenAI-compatible API with locust: workloads, streaming client, report, runner."""
