"""Settings, Serve configs and the KV hand-off model: pure logic, no cluster."""

from pathlib import Path

import pytest

from deployments.config import SettingsError, load_serve_config, parse_settings
from deployments.engine.vllm_engine import EngineSpec
from deployments.kv import Handoff, KVTransferParams
from deployments.settings import PDServeSettings

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


@pytest.mark.parametrize("name,mode", [("local-disaggregated.yaml", "disaggregated"),
                                       ("local-colocated.yaml", "colocated")])
def test_shipped_configs_load(name, mode):
    [(app, settings)] = load_serve_config(CLUSTER / name)
    assert app.import_path == "deployments.app:build_app"
    assert settings.mode == mode
    assert settings.http.port == 8000


def test_local_disaggregated_binds_prefill_and_decode_to_different_cores():
    [(_, s)] = load_serve_config(CLUSTER / "local-disaggregated.yaml")
    assert s.prefill.bind_for(0) != s.decode.bind_for(0)


def test_unknown_field_is_named():
    with pytest.raises(SettingsError, match=r"engine\.max_model_lenn: Extra inputs are not permitted"):
        parse_settings({"mode": "colocated", "colocated": {}, "engine": {"max_model_lenn": 10}})


def test_invalid_value_is_named():
    with pytest.raises(SettingsError, match=r"prefill\.num_replicas"):
        parse_settings({"prefill": {"num_replicas": 0}, "decode": {}})


@pytest.mark.parametrize("args,message", [
    ({"mode": "disaggregated", "decode": {}}, "mode 'disaggregated' needs the pool\\(s\\) 'prefill' and 'decode'"),
    ({"mode": "colocated"}, "mode 'colocated' needs the pool\\(s\\) 'colocated'"),
    ({"mode": "colocated", "colocated": {}, "prefill": {}}, "pool 'prefill' is not valid with mode 'colocated'"),
    ({"mode": "elastic"}, "mode 'elastic' needs the pool\\(s\\) 'elastic'"),
    ({"mode": "elastic", "elastic": {}, "decode": {}}, "pool 'decode' is not valid with mode 'elastic'"),
    ({"mode": "colocated", "colocated": {}, "elastic": {}}, "pool 'elastic' is not valid with mode 'colocated'"),
    ({"prefill": {}, "decode": {}, "kv_connector": {"kv_buffer_device": "cuda"}}, "needs pools with num_gpus"),
])
def test_cross_field_rules(args, message):
    with pytest.raises(SettingsError, match=message):
        parse_settings(args)


def test_bad_config_file_names_application(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    args: {mode: sideways}\n")
    with pytest.raises(SettingsError, match=r"(?s)application 'x'.*mode"):
        load_serve_config(bad)


def test_pull_deadline_must_fire_before_the_prefill_lease():
    with pytest.raises(SettingsError, match="kv_pull_timeout_s must be shorter"):
        parse_settings({"prefill": {}, "decode": {}, "routing": {"kv_pull_timeout_s": 30, "kv_lease_s": 30}})


def test_cpu_bind_cycles_by_local_rank():
    s = parse_settings({"prefill": {"cpu_bind": ["0-1", "2-3"]}, "decode": {}})
    assert [s.prefill.bind_for(r) for r in range(3)] == ["0-1", "2-3", "0-1"]
    assert s.decode.bind_for(0) is None


def _spec(role, **engine):
    s = PDServeSettings.model_validate({"prefill": {}, "decode": {}, "engine": engine})
    return EngineSpec(model="/m", served_model_name="m", role=role, engine=s.engine,
                      kv_connector=s.kv_connector, engine_id="e1")


def test_engine_args_carry_kv_roles():
    import json

    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        args = _spec(role).cli_args()
        kv = json.loads(args[args.index("--kv-transfer-config") + 1])
        assert kv == {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu",
                      "engine_id": "e1", "kv_load_failure_policy": "recompute",
                      "kv_connector_extra_config": {"kv_lease_duration": 30, "enforce_handshake_compat": False}}
    assert "--kv-transfer-config" not in _spec("colocated").cli_args()


def test_engine_args_from_settings():
    args = _spec("decode", max_model_len=4096, enforce_eager=False, extra_args=["--seed", "1"]).cli_args()
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert "--enforce-eager" not in args and "--block-size" not in args and "--max-num-batched-tokens" not in args
    assert args[-2:] == ["--seed", "1"]
    chunked = _spec("decode", max_num_batched_tokens=256).cli_args()  # chunked prefill in steps of 256 tokens
    assert chunked[chunked.index("--max-num-batched-tokens") + 1] == "256"


HANDOFF = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[3, 4]],
           "remote_engine_id": "prefill-1", "remote_request_id": "r1", "remote_host": "10.0.0.1",
           "remote_port": 5600, "tp_size": 1, "transfer_mode": "pull"}


def test_kv_params_parse_and_round_trip():
    p = KVTransferParams.model_validate(HANDOFF)
    assert p.num_blocks == 2
    engine_side = Handoff(p, "p1", expires_at=0.0, fingerprint="").for_engine()
    assert engine_side["transfer_mode"] == "pull"  # connector-specific keys pass through
    assert engine_side["remote_port"] == 5600


@pytest.mark.parametrize("broken", [{"remote_port": 0}, {"remote_host": None}, {"remote_engine_id": None}])
def test_kv_params_reject_malformed_handoff(broken):
    with pytest.raises(ValueError):
        KVTransferParams.model_validate({**HANDOFF, **broken})


def test_kv_fingerprint_follows_model_content_and_layout_not_its_folder(tmp_path):
    from deployments.engine.vllm_engine import kv_fingerprint

    layout = {"dtype": "torch.bfloat16", "block_size": 128}
    for node in ("node-a", "node-b"):  # the same model, copied into each node's own folder
        (tmp_path / node).mkdir()
        (tmp_path / node / "config.json").write_text('{"num_hidden_layers": 30}')
        (tmp_path / node / "model.safetensors").write_bytes(b"w" * 64)
    same = kv_fingerprint(str(tmp_path / "node-a"), layout)
    assert same == kv_fingerprint(str(tmp_path / "node-b"), layout)
    assert same != kv_fingerprint(str(tmp_path / "node-a"), layout | {"block_size": 16})
    (tmp_path / "node-b" / "config.json").write_text('{"num_hidden_layers": 24}')  # another model
    assert same != kv_fingerprint(str(tmp_path / "node-b"), layout)
    assert kv_fingerprint("org/model", layout) != kv_fingerprint("org/other-model", layout)


def test_each_pool_sets_its_own_engine_on_top_of_the_shared_one():
    s = PDServeSettings.model_validate({
        "engine": {"max_num_seqs": 16, "extra_args": ["--seed", "1"]},
        "prefill": {"num_gpus": 1},
        "decode": {"num_gpus": 4, "engine": {"tensor_parallel_size": 4, "max_num_seqs": 256,
                                             "extra_args": ["--max-num-batched-tokens", "8192"]}}})
    prefill, decode = s.prefill.engine_for(s.engine), s.decode.engine_for(s.engine)
    assert (prefill.tensor_parallel_size, prefill.max_num_seqs) == (1, 16)
    assert (decode.tensor_parallel_size, decode.max_num_seqs) == (4, 256)
    assert decode.extra_args == ["--seed", "1", "--max-num-batched-tokens", "8192"]
    args = EngineSpec(model="/m", served_model_name="m", role="decode", engine=decode, kv_connector=s.kv_connector,
                      engine_id="e1", num_gpus=4).cli_args()
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert args[-4:] == ["--seed", "1", "--max-num-batched-tokens", "8192"]
    assert "--tensor-parallel-size" not in EngineSpec(model="/m", served_model_name="m", role="prefill",
                                                      engine=prefill, kv_connector=s.kv_connector,
                                                      engine_id="e2").cli_args()


@pytest.mark.parametrize("pool, why", [
    ({"engine": {"max_num_seqs": 0}}, "prefill.engine.max_num_seqs"),
    ({"engine": {"no_such_field": 1}}, "prefill.engine.no_such_field"),
    ({"num_gpus": 1, "engine": {"tensor_parallel_size": 2}}, "needs num_gpus >= 2"),
])
def test_bad_pool_engine_settings_name_the_field(pool, why):
    with pytest.raises(SettingsError, match=why):
        parse_settings({"mode": "disaggregated", "prefill": pool, "decode": {}})


@pytest.mark.parametrize("config", ["gpu-1node.yaml", "gpu-multinode.yaml"])
def test_gpu_configs_load_and_build_offline(config):
    from tests.helm_tools import app_deployments

    [(_, s)] = load_serve_config(CLUSTER / config)
    assert s.kv_connector.kv_buffer_device == "cuda" and s.prefill.num_gpus >= 1 and s.decode.num_gpus >= 1
    for pool in (s.prefill, s.decode):
        engine = pool.engine_for(s.engine)
        assert not engine.enforce_eager and engine.tensor_parallel_size <= pool.num_gpus
        assert "cuda_copy" in pool.env["UCX_TLS"]  # NIXL refuses a UCX_TLS without it on a GPU host
    assert s.routing.kv_pull_timeout_s < s.routing.kv_lease_s
    built = app_deployments(s)
    assert built["DecodeServer"].ray_actor_options["num_gpus"] == s.decode.num_gpus


def test_direct_ingress_port_range_must_leave_the_proxy_port():
    with pytest.raises(SettingsError, match=r"http\.direct_ingress_port.*8000"):
        parse_settings({"mode": "colocated", "colocated": {}, "http": {"port": 8000, "direct_ingress_port": 7950}})
    ok = parse_settings({"mode": "colocated", "colocated": {}, "http": {"port": 8000, "direct_ingress_port": 8010}})
    assert ok.http.direct_ingress_port == 8010


def test_ray_node_env_turns_on_direct_ingress_only_when_asked():
    from deployments.api.direct_ingress import ray_node_env
    from deployments.settings import RAY_NODE_ENV

    plain = parse_settings({"mode": "colocated", "colocated": {}})
    direct = parse_settings({"mode": "colocated", "colocated": {}, "http": {"direct_ingress_port": 8010}})
    assert ray_node_env([plain]) == RAY_NODE_ENV
    env = ray_node_env([direct, direct])
    assert RAY_NODE_ENV.items() <= env.items()
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == \
        ("8010", "8109")
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"  # a restarted Ingress replica takes its port back


def test_ingress_refuses_direct_ingress_on_a_node_started_without_it():
    from deployments.api.direct_ingress import direct_ingress_missing, ray_node_env

    plain = parse_settings({"mode": "colocated", "colocated": {}})
    direct = parse_settings({"mode": "colocated", "colocated": {}, "http": {"direct_ingress_port": 8010}})
    assert direct_ingress_missing(plain, {}) is None
    assert direct_ingress_missing(direct, ray_node_env([direct])) is None
    why = direct_ingress_missing(direct, {})
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in why and "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=8010" in why
    other = ray_node_env([direct]) | {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "8200"}  # started for another port
    assert "8010" in direct_ingress_missing(direct, other)


def test_every_node_and_engine_runs_the_header_guard_without_usage_statistics():
    """Nothing phones home (vLLM's usage statistics), and Serve's proxy on every node runs the header guard, which
    the import path must name."""
    import importlib

    from deployments.settings import ENGINE_PRIVACY_ENV, RAY_NODE_ENV

    assert ENGINE_PRIVACY_ENV == {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    assert ENGINE_PRIVACY_ENV.items() <= RAY_NODE_ENV.items()
    module, _, name = RAY_NODE_ENV["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    [middleware] = getattr(importlib.import_module(module), name)()
    assert middleware.cls.__name__ == "HeaderGuard"


def test_credentials_keep_the_key_out_of_node_env_and_files_private(tmp_path):
    import stat

    from deployments.credentials import SINGLE_NODE_ENV, api_key_file, node_environ, ray_auth_env

    env = {"PDSERVE_API_KEY": "k1,k2", "PATH": "/bin", SINGLE_NODE_ENV: "0"}
    assert node_environ(env) == {"PATH": "/bin", SINGLE_NODE_ENV: "0"}
    assert node_environ(env, single_node=False) == {"PATH": "/bin"}
    path = api_key_file(tmp_path, env)
    assert Path(path).read_text() == "k1\nk2\n" and stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    assert api_key_file(tmp_path, {"PDSERVE_API_KEY_FILE": "keys.txt"}).endswith("/keys.txt")
    assert api_key_file(tmp_path, {}) is None
    token = tmp_path / "ray" / "auth_token"
    assert ray_auth_env({"RAY_AUTH_TOKEN_PATH": str(token)}) == {"RAY_AUTH_MODE": "token"}
    assert len(token.read_text()) == 64 and stat.S_IMODE(token.stat().st_mode) == 0o600
    before = token.read_text()
    ray_auth_env({"RAY_AUTH_TOKEN_PATH": str(token)})
    assert token.read_text() == before  # made once, then kept
    assert ray_auth_env({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}) == {}
    assert not (tmp_path / "none").exists()
