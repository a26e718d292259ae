"""Structured-output specs are compiled off the replica's event loop, with a time limit.

vLLM checks a request's regex, JSON schema, grammar or choice list by compiling it with xgrammar inside
``SamplingParams.verify``, synchronously, on the event loop that serves every other request of the replica (its
regex check has a 5 s timeout; JSON schemas and grammars none). A hostile spec would stall every stream the
replica carries. So the engine compiles the spec first, in one worker thread, bounded by
``limits.structured_output_compile_timeout_s``; a spec that compiled there is remembered, and vLLM's own check
(patched here) then skips the compile for it and keeps its cheap rewrite of a choice list into a grammar.
A spec that fails or runs past the limit is answered 400 and never reaches vLLM's check.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

from ..kv import STRUCTURED_OUTPUT_FIELDS
from ..replies import ErrorReply

logger = logging.getLogger("ray.serve.pdserve.engine")

# xgrammar prefixes its messages with a time and its C++ source file: not for clients
_NATIVE_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")
NUM_REMEMBERED_SPECS = 1024  # specs that compiled, newest kept: vLLM's check skips the compile for them


def spec_key(structured_outputs) -> str:
    """One string per structured-output spec (every field vLLM reads), before vLLM rewrites a choice list."""
    return json.dumps({f.name: getattr(structured_outputs, f.name) for f in fields(structured_outputs)},
                      sort_keys=True, default=str)


class StructuredOutputGate:
    """Compiles each new spec in one worker thread, ahead of vLLM's on-loop check, within a time limit."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._compiled: OrderedDict[str, None] = OrderedDict()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-grammar")
        self._original = None

    def install(self) -> None:
        """Route vLLM's xgrammar check through ``_check`` (vLLM imports it at call time, from its module)."""
        from vllm.v1.structured_output import backend_xgrammar

        if self._original is None:
            self._original = backend_xgrammar.validate_xgrammar_grammar
            backend_xgrammar.validate_xgrammar_grammar = self._check

    def _check(self, sampling_params) -> None:
        spec = sampling_params.structured_outputs
        if spec is not None and spec_key(spec) in self._compiled:
            if spec.choice:  # what vLLM's check does to a choice list, without compiling it again
                from vllm.v1.structured_output.backend_xgrammar import choice_as_grammar

                spec.grammar, spec.choice = choice_as_grammar(spec.choice), None
            return
        self._original(sampling_params)

    async def precheck(self, request, serving) -> ErrorReply | None:
        """Compile the request's spec, if it has one not compiled before; an ErrorReply (400) if it fails."""
        if not any(getattr(request, name, None) for name in STRUCTURED_OUTPUT_FIELDS):
            return None  # most requests: no sampling parameters built here for nothing
        try:
            params = request.to_sampling_params(1, getattr(serving, "default_sampling_params", None) or {})
        except Exception:  # not ours to judge: vLLM's own path answers it
            return None
        spec = getattr(params, "structured_outputs", None)
        if spec is None or self._original is None:
            return None
        key = spec_key(spec)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return None
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._worker, self._original, copy.deepcopy(params)),
                                   self.timeout_s)
        except TimeoutError:
            logger.warning("structured-output spec of %d bytes not compiled within %.1f s: refused",
                           len(key), self.timeout_s)
            return ErrorReply(400, f"the structured-output spec did not compile within {self.timeout_s:g} s",
                              param="structured_outputs")
        except Exception as exc:
            message = _NATIVE_PREFIX.sub("", str(exc)).strip()
            return ErrorReply(400, f"invalid structured output: {message}", param="structured_outputs")
        self._compiled[key] = None
        while len(self._compiled) > NUM_REMEMBERED_SPECS:
            self._compiled.popitem(last=False)
        return None
