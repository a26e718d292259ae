"""The cross-check's pure parts (no server): the prompts both tools read, the vllm bench command, the verdict."""

import json

import pytest

from loadtests.bench.crosscheck import compare, markdown, vllm_bench_command, write_prompts


def test_prompts_file_is_the_profiles_prompts_in_order(tmp_path):
    from loadtests.locust.workloads import Workload

    path = tmp_path / "p.jsonl"
    write_prompts(path, "chat", 5, 64, seed=3, session=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    workload = Workload("chat", seed=3, endpoint="completions", max_tokens=64)
    expected = ["Session 2. " + workload.prompt(i).completion_prompt() for i in range(5)]
    assert [line["prompt"] for line in lines] == expected


@pytest.mark.integration
def test_vllm_bench_command_is_accepted_by_vllms_own_parser(tmp_path):
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cmd = vllm_bench_command("http://127.0.0.1:8000", "m", "/tok", tmp_path / "p.jsonl", 0.5, 60, 64, 7, tmp_path)
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(cmd[cmd.index("serve") + 1:])
    assert (args.dataset_name, args.request_rate, args.num_prompts, args.custom_output_len) == ("custom", 0.5, 60, 64)
    assert args.ignore_eos and args.skip_chat_template and args.disable_shuffle and args.save_result


def test_medians_within_tolerance_pass_and_outside_fail():
    locust = {"latency_s": {"ttft": {"p50": 0.22}, "itl": {"p50": 0.060}, "tpot": {"p50": 0.07}}}
    rows = compare(locust, {"median_ttft_ms": 200.0, "median_itl_ms": 50.0, "median_tpot_ms": 70.0}, 0.15)
    assert rows["ttft"]["within"] is True and abs(rows["ttft"]["ratio"] - 1.1) < 1e-9
    assert rows["itl"]["within"] is False  # 1.2x
    assert rows["tpot"]["within"] is None  # reported, not checked
    assert "| ITL | 0.0600 | 0.0500 | 1.200 | **no** |" in markdown(rows, 0.15)
