#!/usr/bin/env python3
"""GPU check: move memory between two processes through NIXL, as pdserve's prefill and decode engines do.

Usage::

    python cluster/gpu_check.py [--device cuda|cpu] [--size-mib 256] [--iters 20] [--out result.json]

Needs only PyTorch and the NIXL wheels (no vLLM, no Ray). Two processes (``spawn``) stand in for the engines:

* the *prefill* side (target) fills a buffer with a known pattern and registers it with NIXL;
* the *decode* side (initiator) registers its own buffer, receives the target's agent metadata and serialized
  descriptors through a pipe (relayed by this process), and READs the target's buffer: the direction vLLM's NIXL
  connector uses.

Both children load pdserve's NIXL plugin (``deployments/engine/nixl_plugin.py``) before creating their agents, so
the progress thread gets the delay from ``PDSERVE_NIXL_PROGRESS_DELAY_US``. The transfer runs twice: delay 0 (NIXL's
busy polling) and 1000 µs (pdserve's default). Each run verifies the bytes read (after a warm-up READ and again
after the timed ones), times ``--iters`` READs of ``--size-mib`` MiB, and reports GB/s (bytes / seconds / 1e9) and
the median latency per READ. The children run with ``UCX_PROTO_INFO=y`` and ``UCX_LOG_LEVEL=info``; their output
goes to log files from which the UCX lanes and the protocols chosen for remote memory access are reported. UCX_TLS
and the other ``UCX_*`` variables pass through from the caller's environment (none is set here: on a GPU host NIXL
refuses a UCX_TLS without cuda_copy).

``--device cuda`` (the default) skips cleanly (exit 0) where torch sees no CUDA device; ``--device cpu`` runs the
same check with host (DRAM) buffers. The prefill side uses cuda:0, the decode side cuda:1 where there is one.
Failures (agent creation, a transfer in state ERR, a child that dies, a phase over 60 s) print one line with the
NIXL/UCX message, go into the JSON and make the exit status non-zero; children that time out are killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DELAY_ENV = "PDSERVE_NIXL_PROGRESS_DELAY_US"  # same name as deployments.engine.nixl_plugin.DELAY_ENV
PROGRESS_DELAYS_US = (0, 1000)
PHASE_TIMEOUT_S = 60.0
TOTAL_BUDGET_S = 270.0  # the whole check stays under 5 minutes, even when every phase times out
PATTERN_XOR = 0x5A5A5A5A
SKIP_LINE = "gpu_check: no CUDA device here: skipped"
UCX_VERBOSE_LEVELS = ("info", "debug", "trace", "req", "data", "async", "func", "poll")
# "[1795751042.441068] [host:7174 :0]  " that UCX puts before every line
UCX_PREFIX = re.compile(r"^\[(\d+\.\d+)\] \[([^\]]+)\]\s*")
TRANSPORT = re.compile(r"\b([a-z][a-z0-9_]*)/([A-Za-z0-9_:.\-]+)")
ERROR_LINE = re.compile(r"UCX\s+ERROR|NIXL\s+ERROR|^[EF]\d{4} |error|fail|abort", re.IGNORECASE)
GLOG_PREFIX = re.compile(r"^([EFWI])\d{4} [\d:.]+\s+\d+ ")  # "E1127 03:47:12.403639 9268 " before NIXL's C++ logs


class PhaseError(RuntimeError):
    """A run failed in one phase; the message is the one-line error for the report, ``role`` the side at fault."""

    def __init__(self, message: str, role: str, info: dict[str, Any] | None = None):
        super().__init__(message)
        self.role = role
        self.info = info or {}


# ---------------------------------------------------------------------------------------------------------------
# Children (spawned): nothing heavy is imported at module level, so spawning re-imports this file cheaply.

_child_info: dict[str, Any] = {}  # what a child loaded; sent with its first message, or with its error


def _load_nixl() -> tuple[Any, Any]:
    """Load pdserve's NIXL plugin, then NIXL's Python API (the module vLLM would use): the agent class and its
    config class."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    # The plugin asks vLLM which NIXL module to patch; without vLLM it takes NIXL's meta package (``nixl._api``),
    # which is what vLLM resolves on CUDA too. Hide an installed vLLM so the check stays light and vLLM-free.
    if "vllm" not in sys.modules:
        sys.modules["vllm"] = None  # type: ignore[assignment]
    from deployments.engine import nixl_plugin

    nixl_plugin.register()
    from nixl._api import nixl_agent, nixl_agent_config

    api = sys.modules["nixl._api"]
    delay_us = int(os.environ.get(DELAY_ENV, "1000"))
    patched = bool(getattr(api.nixlBind, "pdserve_patched", False))
    _child_info.update(nixl_module=api.__name__, plugin_patched=patched)
    if delay_us > 0 and not patched:
        raise RuntimeError(f"pdserve's NIXL plugin did not patch {api.__name__} (delay {delay_us} us)")
    return nixl_agent, nixl_agent_config


def _make_agent(name: str) -> Any:
    nixl_agent, nixl_agent_config = _load_nixl()
    agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
    if "UCX" not in agent.backends:
        raise RuntimeError(f"NIXL agent {name} has no UCX backend (plugins available: {agent.get_plugin_list()})")
    return agent


def _pattern(torch: Any, num_words: int, device: str) -> Any:
    """Unique 32-bit words: a misplaced, missing or stale chunk anywhere shows."""
    return torch.arange(num_words, dtype=torch.int32, device=device).bitwise_xor_(PATTERN_XOR)


def _sync(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _serve_target(conn: Connection, cfg: dict[str, Any]) -> None:
    """Prefill side: own the pattern buffer, publish it, keep it registered until the parent says done."""
    import torch

    device = cfg["prefill_device"]
    buffer = _pattern(torch, cfg["num_bytes"] // 4, device)
    _sync(torch, device)
    agent = _make_agent(f"gpu-check-prefill-{cfg['delay_us']}")
    reg_descs = agent.register_memory(buffer)
    conn.send({"kind": "ready", "info": _child_info, "metadata": agent.get_agent_metadata(),
               "descs": agent.get_serialized_descs(agent.get_xfer_descs(buffer))})
    conn.recv()  # "done": the decode side has finished reading
    agent.deregister_memory(reg_descs)
    conn.send({"kind": "closed"})


def _read_once(agent: Any, handle: Any, deadline: float) -> None:
    state = agent.transfer(handle)
    while state == "PROC":
        if time.monotonic() > deadline:
            raise TimeoutError("NIXL READ still in progress at the child's deadline")
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        raise RuntimeError(f"NIXL READ ended in state {state}")


def _mismatch(torch: Any, buffer: Any, expected: Any) -> str | None:
    if torch.equal(buffer, expected):
        return None
    differ = buffer != expected
    first_word = int(differ.nonzero()[0].item())
    return (f"data mismatch: {int(differ.sum().item())} of {buffer.numel()} words differ "
            f"(first at byte offset {first_word * 4})")


def _read_initiator(conn: Connection, cfg: dict[str, Any]) -> None:
    """Decode side: READ the prefill side's buffer through NIXL; verify and time it."""
    import torch

    device = cfg["decode_device"]
    num_words = cfg["num_bytes"] // 4
    buffer = torch.zeros(num_words, dtype=torch.int32, device=device)
    expected = _pattern(torch, num_words, device)
    agent = _make_agent(f"gpu-check-decode-{cfg['delay_us']}")
    reg_descs = agent.register_memory(buffer)
    conn.send({"kind": "ready", "info": _child_info})

    peer = conn.recv()
    remote_agent = agent.add_remote_agent(peer["metadata"])
    remote_descs = agent.deserialize_descs(peer["descs"])
    handle = agent.initialize_xfer("READ", agent.get_xfer_descs(buffer), remote_descs, remote_agent)
    deadline = time.monotonic() + PHASE_TIMEOUT_S + 30.0  # the parent kills at PHASE_TIMEOUT_S; a safety net
    _read_once(agent, handle, deadline)  # warm-up: connection, registration caches
    _sync(torch, device)
    error = _mismatch(torch, buffer, expected)
    if error is None:
        buffer.zero_()
        _sync(torch, device)
        latencies_s = []
        for _ in range(cfg["num_iters"]):
            start_s = time.perf_counter()
            _read_once(agent, handle, deadline)
            latencies_s.append(time.perf_counter() - start_s)
        _sync(torch, device)
        error = _mismatch(torch, buffer, expected)
    agent.release_xfer_handle(handle)
    agent.remove_remote_agent(remote_agent)
    agent.deregister_memory(reg_descs)
    if error is not None:
        raise RuntimeError(error)
    total_s = sum(latencies_s)
    conn.send({"kind": "result", "total_s": total_s,
               "gbps": cfg["num_bytes"] * cfg["num_iters"] / total_s / 1e9,
               "median_ms": statistics.median(latencies_s) * 1e3,
               "min_ms": min(latencies_s) * 1e3, "max_ms": max(latencies_s) * 1e3})


def _child_main(role: str, conn: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of both children: output to a log file, environment set before NIXL (and UCX) load."""
    log_fd = os.open(cfg["log_paths"][role], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)  # UCX logs to stdout
    os.dup2(log_fd, 2)  # NIXL, the plugin and Python to stderr
    os.environ.update(cfg["env"])
    try:
        (_serve_target if role == "prefill" else _read_initiator)(conn, cfg)
    except BaseException as exc:  # noqa: B036 (reported to the parent, then exit non-zero)
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"gpu_check child {role}: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError, ValueError):  # the parent may be gone already
            conn.send({"kind": "error", "error": message, "info": _child_info})
        sys.exit(1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------------------
# Parent: runs the children, relays metadata, enforces the timeouts, reads the logs.


def _await(conn: Connection, who: str, phase: str, watched: list[BaseProcess], timeout_s: float) -> dict[str, Any]:
    """The next message from ``who``; a PhaseError when it reports an error, a watched child exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if conn.poll(0.1):
                message = conn.recv()
                if message.get("kind") == "error":
                    raise PhaseError(f"{who} side failed during {phase}: {message['error']}", who, message["info"])
                return message
        except (EOFError, OSError):
            watched[0].join(2.0)
            raise PhaseError(f"{who} side closed its pipe during {phase} (exit code {watched[0].exitcode})",
                             who) from None
        for proc in watched:
            if proc.exitcode is not None and not conn.poll(0):
                raise PhaseError(f"{proc.name} side exited with code {proc.exitcode} during {phase}", proc.name)
        if time.monotonic() > deadline:
            raise PhaseError(f"timeout after {timeout_s:.0f} s during {phase} waiting for the {who} side "
                             "(children killed)", who)


def _strip_ucx_prefix(line: str) -> tuple[str, str]:
    match = UCX_PREFIX.match(line)
    return (match.group(0), line[match.end():]) if match else ("", line)


def _proto_tables(lines: list[str]) -> list[tuple[str, str, list[list[str]]]]:
    """UCX_PROTO_INFO tables (all lines of one table share UCX's timestamp prefix): (context, title, rows)."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        prefix, rest = _strip_ucx_prefix(line)
        if prefix and rest.startswith("|"):
            groups.setdefault(prefix, []).append(rest)
    tables = []
    for rows in groups.values():
        cells = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]
        if len(cells) >= 3 and len(cells[0]) == 1 and len(cells[1]) == 1:
            tables.append((cells[0][0], cells[1][0], [c for c in cells[2:] if len(c) == 3 and c[0] != "Range"]))
    return tables


def _summarize_log(role: str, text: str) -> dict[str, Any]:
    """Lanes and remote-memory protocols UCX chose, the plugin's line, error lines and UCX's version."""
    lines = text.splitlines()
    lanes: list[str] = []
    read_transports: list[str] = []
    summary: dict[str, Any] = {"ucx_version": None, "plugin_line": None, "errors": []}
    for line in lines:
        _, rest = _strip_ucx_prefix(line)
        if "UCX  INFO  Version" in rest:
            summary["ucx_version"] = rest.split("Version", 1)[1].split()[0]
        elif ("ucp_worker" in rest and "cfg#" in rest) or "UCX_* env variables" in rest:
            # "<agent> intra-node cfg#1 rma_am(tcp/lo)  amo_am(tcp/lo)  am(tcp/lo cma/memory)  ka(tcp/lo)"
            lanes.append(f"{role}: " + rest.split("UCX  INFO", 1)[-1].strip())
        elif rest.startswith("[pdserve] NIXL agent"):
            summary["plugin_line"] = rest.strip()
        if ERROR_LINE.search(rest) and not rest.startswith(("|", "+")) and "gpu_check child" not in rest:
            summary["errors"].append(" ".join(GLOG_PREFIX.sub(r"\1 ", rest).split())[:300])
    for context, title, rows in _proto_tables(lines):
        if "remote memory" not in title:
            continue
        ranges = "; ".join(f"{rng} {description} {config}" for rng, description, config in rows)
        lanes.append(f"{role}: {context}: {title}: {ranges}")
        if "read" in title:
            read_transports += [f"{tl}/{dev}" for _, _, config in rows for tl, dev in TRANSPORT.findall(config)]
    summary["lanes"] = list(dict.fromkeys(lanes))
    summary["read_transports"] = list(dict.fromkeys(read_transports))
    return summary


def _stop(procs: list[BaseProcess], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)


def _run_once(delay_us: int, base_cfg: dict[str, Any], log_dir: Path, deadline: float) -> dict[str, Any]:
    """One prefill/decode pair with one progress delay; the per-delay entry of the report."""
    ctx = multiprocessing.get_context("spawn")
    log_paths = {role: str(log_dir / f"{role}-{delay_us}us.log") for role in ("prefill", "decode")}
    env = dict(base_cfg["env"], **{DELAY_ENV: str(delay_us)})
    cfg = dict(base_cfg, delay_us=delay_us, log_paths=log_paths, env=env)
    run: dict[str, Any] = {"progress_delay_us": delay_us, "ok": False, "gbps": None, "median_ms": None,
                           "error": None, "nixl_module": None, "plugin_patched": {}}
    conns: dict[str, Connection] = {}
    procs: dict[str, BaseProcess] = {}
    phase = "start"
    start_s = time.monotonic()
    failed_role = "decode"
    finished = False

    def loaded(role: str, info: dict[str, Any]) -> None:
        if info:
            run["nixl_module"] = info["nixl_module"]
            run["plugin_patched"][role] = info["plugin_patched"]
    try:
        for role in ("prefill", "decode"):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_child_main, args=(role, child_end, cfg), name=role, daemon=True)
            proc.start()
            procs[role] = proc
            child_end.close()  # so a dead child reads as EOF here
            conns[role] = parent_end
        both = [procs["prefill"], procs["decode"]]

        def timeout_s() -> float:
            return max(1.0, min(PHASE_TIMEOUT_S, deadline - time.monotonic()))

        phase = "setup (agents, registration)"
        target_ready = _await(conns["prefill"], "prefill", phase, both, timeout_s())
        decode_ready = _await(conns["decode"], "decode", phase, [procs["decode"], procs["prefill"]], timeout_s())
        loaded("prefill", target_ready["info"])
        loaded("decode", decode_ready["info"])
        run["setup_s"] = time.monotonic() - start_s
        conns["decode"].send({"metadata": target_ready["metadata"], "descs": target_ready["descs"]})

        phase = "transfer (warm-up, verify, timed READs)"
        result = _await(conns["decode"], "decode", phase, [procs["decode"], procs["prefill"]], timeout_s())
        run.update({k: v for k, v in result.items() if k != "kind"}, ok=True)

        phase = "teardown"
        conns["prefill"].send("done")
        _await(conns["prefill"], "prefill", phase, [procs["prefill"]], timeout_s())
        finished = True
    except PhaseError as exc:
        run["error"], failed_role = str(exc), exc.role
        loaded(exc.role, exc.info)
        for role, proc in procs.items():  # a peer that died first is the cause (exit codes of those killed: -9)
            if role != exc.role and proc.exitcode not in (None, 0):
                run["error"] += f" (the {role} side had exited with code {proc.exitcode})"
    except Exception as exc:  # a pipe to a child that is already gone, a child that cannot start
        run["error"] = f"during {phase}: {type(exc).__name__}: {exc}"
    finally:
        _stop(list(procs.values()), grace_s=10.0 if finished else 3.0)
        for conn in conns.values():
            conn.close()
        run["wall_s"] = time.monotonic() - start_s
    run.update(lanes=[], read_transports=[], ucx_version=None, plugin_lines={}, exit_codes={})
    log_errors: dict[str, list[str]] = {}
    for role, path in log_paths.items():
        summary = _summarize_log(role, Path(path).read_text(errors="replace") if Path(path).exists() else "")
        run["lanes"] += summary["lanes"]
        run["read_transports"] += [t for t in summary["read_transports"] if t not in run["read_transports"]]
        run["ucx_version"] = run["ucx_version"] or summary["ucx_version"]
        run["plugin_lines"][role] = summary["plugin_line"]
        run["exit_codes"][role] = procs[role].exitcode if role in procs else None
        log_errors[role] = summary["errors"][-3:]
    if run["error"] is not None:
        run["ok"] = False
        # NIXL's and UCX's own words: from the side at fault, else from its peer (which may have crashed)
        other_role = "prefill" if failed_role == "decode" else "decode"
        role = failed_role if log_errors.get(failed_role) else other_role
        if log_errors.get(role):
            run["error"] += f" | {role} log: " + " | ".join(log_errors[role])
    return run


def _child_env() -> dict[str, str]:
    """What the children get on top of the inherited environment (which carries the user's UCX_* through).
    UCX_RCACHE_MAX_UNRELEASED as vLLM sets it before its first NIXL import (the plugin does so only for a positive
    delay): the two runs differ in the progress delay only."""
    env = {"UCX_PROTO_INFO": "y", "UCX_RCACHE_MAX_UNRELEASED": os.environ.get("UCX_RCACHE_MAX_UNRELEASED", "1024")}
    level = os.environ.get("UCX_LOG_LEVEL", "").lower()
    env["UCX_LOG_LEVEL"] = level if level in UCX_VERBOSE_LEVELS else "info"
    return env


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _print_report(result: dict[str, Any]) -> None:
    ucx = result["ucx_env"]
    print(f"gpu_check: {result['devices']['prefill']} -> {result['devices']['decode']}, {result['size_mib']} MiB x "
          f"{result['num_iters']} READs; nixl {result['nixl_version']} ({result['nixl_module'] or '?'}), "
          f"UCX {result['ucx_version'] or '?'}, torch {result['torch_version']}")
    unset = "<unset: UCX default, all>"
    print(f"UCX_TLS={ucx['UCX_TLS'] or unset} UCX_NET_DEVICES={ucx['UCX_NET_DEVICES'] or unset}")
    print(f"{'delay_us':>8}  {'ok':<3} {'GB/s':>8} {'median_ms':>10}  read via")
    for run in result["runs"]:
        gbps = f"{run['gbps']:.2f}" if run["gbps"] is not None else "-"
        median = f"{run['median_ms']:.3f}" if run["median_ms"] is not None else "-"
        print(f"{run['progress_delay_us']:>8}  {'yes' if run['ok'] else 'NO':<3} {gbps:>8} {median:>10}  "
              f"{', '.join(run['read_transports']) or '-'}")
    last = result["runs"][-1]
    if last["lanes"]:
        print(f"UCX lanes and remote-memory protocols (delay {last['progress_delay_us']} us):")
        for line in last["lanes"]:
            print(f"  {line}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: GPU memory (skips where there is no GPU); cpu: host memory")
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per READ, in MiB")
    parser.add_argument("--iters", type=int, default=20, help="timed READs per progress delay (after one warm-up)")
    parser.add_argument("--out", type=Path, help="write the full result as JSON here")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.iters < 1:
        parser.error("--size-mib and --iters must be >= 1")
    return args


def _write(out: Path | None, result: dict[str, Any]) -> None:
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(SKIP_LINE)
        _write(args.out, {"device": "cuda", "skipped": True, "ok": True, "torch_version": torch.__version__})
        return 0
    if args.device == "cuda":
        num_gpus = torch.cuda.device_count()
        devices = {"prefill": "cuda:0", "decode": "cuda:1" if num_gpus > 1 else "cuda:0"}
        gpu_names = {role: torch.cuda.get_device_name(dev) for role, dev in devices.items()}
    else:
        devices, gpu_names = {"prefill": "cpu", "decode": "cpu"}, {}

    env = _child_env()
    base_cfg = {"num_bytes": args.size_mib * 2**20, "num_iters": args.iters, "env": env,
                "prefill_device": devices["prefill"], "decode_device": devices["decode"]}
    log_dir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    deadline = time.monotonic() + TOTAL_BUDGET_S
    runs = []
    for delay_us in PROGRESS_DELAYS_US:
        if time.monotonic() > deadline - 10.0:
            runs.append({"progress_delay_us": delay_us, "ok": False, "gbps": None, "median_ms": None, "lanes": [],
                         "read_transports": [], "error": f"not run: the {TOTAL_BUDGET_S:.0f} s budget is spent"})
            continue
        runs.append(_run_once(delay_us, base_cfg, log_dir, deadline))

    ok = all(run["ok"] for run in runs)
    result = {
        "device": args.device, "devices": devices, "gpu_names": gpu_names, "size_mib": args.size_mib,
        "num_iters": args.iters, "ok": ok, "python_version": platform.python_version(),
        "torch_version": torch.__version__, "torch_cuda_version": torch.version.cuda,
        "nixl_version": _version("nixl", "nixl-cu12", "nixl-cu13"),
        "nixl_module": next((run["nixl_module"] for run in runs if run.get("nixl_module")), None),
        "ucx_version": next((run["ucx_version"] for run in runs if run.get("ucx_version")), None),
        "ucx_env": {"UCX_TLS": os.environ.get("UCX_TLS"), "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES"),
                    "children": dict(sorted({**{k: v for k, v in os.environ.items() if k.startswith("UCX_")},
                                             **env}.items()))},
        "runs": runs,
    }
    _print_report(result)
    for run in runs:
        if run["error"] is not None:
            print(f"gpu_check: ERROR (progress delay {run['progress_delay_us']} us): {run['error']}",
                  file=sys.stderr)
    if ok:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        result["log_dir"] = str(log_dir)
        print(f"gpu_check: children's logs kept in {log_dir}", file=sys.stderr)
    _write(args.out, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
