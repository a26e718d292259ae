"""`pdserve` commands' own logic, with Ray and Serve faked at their calls (the real cluster runs in the e2e tests)."""

from __future__ import annotations

import json

from deployments import cli


def test_down_deletes_every_application_at_once_and_goes_on_past_one_slow_to_stop(tmp_path, monkeypatch, capsys):
    """The applications are deleted together (their replicas drain in parallel, not one application after another);
    one whose replica takes long to stop is still listed at the deadline: `down` says so and goes on (the head it
    started is stopped, which stops that replica too) instead of failing with the head left running."""
    from types import SimpleNamespace

    from ray import serve

    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    cli._state_file().write_text(json.dumps({"started_head": True, "apps": ["stuck", "fine"]}))
    deleting, commands = [], []
    clock = iter(range(0, 10_000, 50))  # fake monotonic clock: 50 s per look

    monkeypatch.setattr(cli, "_connect", lambda *a, **k: False)
    monkeypatch.setattr(serve, "delete", lambda name, _blocking=True: deleting.append((name, _blocking)))
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"stuck": object()}))
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, **k: commands.append(cmd))
    assert cli.main(["down"]) == 0
    out = capsys.readouterr().out
    assert deleting == [("stuck", False), ("fine", False)]
    assert "application 'fine' deleted" in out and "application 'stuck' not deleted yet" in out
    assert any(cmd[1:3] == ["stop", "--force"] for cmd in commands) and "stopped the local Ray head" in out
    assert not cli._state_file().exists()


def test_down_stops_the_head_after_serve_was_shut_down(tmp_path, monkeypatch, capsys):
    """Serve already shut down (`serve shutdown`, or a test's own cleanup): deleting the applications fails as
    Serve's client finds no controller; `down` still stops the head it started."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    cli._state_file().write_text(json.dumps({"started_head": True, "apps": ["pdserve", "colocated"]}))
    commands = []

    def fake_delete(name, _blocking=True):  # fake of serve.delete with no Serve controller on the cluster
        raise RayServeException("There is no Serve instance running on this Ray cluster.")

    monkeypatch.setattr(cli, "_connect", lambda *a, **k: False)
    monkeypatch.setattr(serve, "delete", fake_delete)
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, **k: commands.append(cmd))
    assert cli.main(["down"]) == 0
    out = capsys.readouterr().out
    assert "Serve is not running" in out and "stopped the local Ray head" in out
    assert any(cmd[1:3] == ["stop", "--force"] for cmd in commands) and not cli._state_file().exists()
