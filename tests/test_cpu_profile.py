"""The CPU profile's attribution of processes to Serve replicas (fake process objects: pure logic)."""

from loadtests.bench.cpu_profile import _component, snapshot


class FakeProcess:
    def __init__(self, *cmdline: str):
        self._cmdline = list(cmdline)

    def cmdline(self) -> list[str]:
        return self._cmdline


def test_replicas_are_named_by_app_and_deployment_from_their_ray_process_title():
    assert _component(FakeProcess("ray::ServeReplica:pdserve:DecodeServer.initialize_and_get_metadata")) \
        == "pdserve:DecodeServer"
    assert _component(FakeProcess("ray::ServeReplica:pdserve:PrefillServer")) == "pdserve:PrefillServer"
    assert _component(FakeProcess("ray::ServeReplica:rayllm-pd:Decode:smollm2-135m-instruct.handle_request")) \
        == "rayllm-pd:Decode:smollm2-135m-instruct"
    assert _component(FakeProcess("python", "-m", "locust")) is None


def test_snapshot_counts_the_machines_busy_time():
    assert snapshot()["all"] > 0
