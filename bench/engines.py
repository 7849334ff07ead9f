"""The engines compared, one adapter each: load a model, then generate exactly N tokens per row, greedy or sampled
(bench.workload.SAMPLINGS), with a timestamp after every step.

    torch-fp32, torch-bf16   transformers `generate` (eager PyTorch, its KV cache), on the shape's HF directory
    fastllm                  fastllm.load + Engine.tokens, on each fastllm model directory (label from its manifest)
    optimum, genai           optional peers, run only when installed: Optimum ORTModelForCausalLM, onnxruntime-genai
    llamacpp                 optional peer (llama-cpp-python and gguf installed): llama.cpp on a GGUF file converted
                             from the shape's HF directory (bench.gguf_export), one file type per --precisions entry
                             (fp32 -> f32, int8 -> q8_0, int4 -> q4_0), flash attention on, batch 1; its own C
                             samplers draw the tokens

Adapters import their libraries inside, so a worker loads nothing but what its engine needs (no torch in a fastllm
worker, which would inflate its memory figure).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastllm.bench.errors import BenchError
from fastllm.bench.workload import Sampling

ENGINE_NAMES = ("torch-fp32", "torch-bf16", "fastllm", "optimum", "genai", "llamacpp")
REFERENCE = "torch-fp32"  # ratios in the report are against this engine


@dataclass(frozen=True)
class EngineSpec:
    name: str  # as given to --engines
    kind: str  # adapter: "torch" | "fastllm" | "optimum" | "genai"
    label: str  # shown in the report, e.g. "torch eager bf16", "fastllm portable fp32"
    precision: str
    model_path: str  # what the worker loads
    skipped: str | None = None  # why this engine does not run here
    max_batch: int | None = None  # larger batches are left out for this engine (with a note)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Timing:
    """One generate call: perf_counter before the prompt goes in, after each step, and row 0's new ids."""

    start: float
    stamps: list[float]
    first_row: list[int]


def size_on_disk(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- choosing the engines for one shape -------------------------------------------------------------------------
def fastllm_spec(model_dir: str | Path) -> EngineSpec:
    """The label comes from the manifest (graph kind and precision), so new graph kinds need no change here."""
    from fastllm.manifest import Manifest

    m = Manifest.read(model_dir)
    method = " dynamic" if (m.quantization or {}).get("method") == "dynamic" else ""
    return EngineSpec("fastllm", "fastllm", f"fastllm {m.graph.kind} {m.precision}{method}", m.precision,
                      str(model_dir))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # the parent package is missing
        return False


def resolve(names: tuple[str, ...], *, hf_dir: Path, fastllm_dirs: list[Path], peer_root: Path,
            precisions: tuple[str, ...] = ("fp32",)) -> list[EngineSpec]:
    """EngineSpecs for the engine names, in order; fastllm gives one per model directory, llamacpp one per file type
    that --precisions asks for."""
    specs: list[EngineSpec] = []
    for name in names:
        if name in ("torch-fp32", "torch-bf16"):
            precision = name.split("-")[1]
            specs.append(EngineSpec(name, "torch", f"torch eager {precision}", precision, str(hf_dir)))
        elif name == "fastllm":
            specs += [fastllm_spec(d) for d in fastllm_dirs]
        elif name == "optimum":
            missing = None if _installed("optimum.onnxruntime") else \
                "optimum[onnxruntime] is not installed (pip install 'optimum[onnxruntime]')"
            specs.append(EngineSpec(name, "optimum", "optimum ORTModelForCausalLM fp32", "fp32",
                                    str(peer_root / "optimum"), skipped=missing))
        elif name == "genai":
            missing = None if _installed("onnxruntime_genai") else \
                "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
            specs.append(EngineSpec(name, "genai", "onnxruntime-genai fp32", "fp32", str(peer_root / "genai"),
                                    skipped=missing))
        elif name == "llamacpp":
            from fastllm.bench.gguf_export import FILE_TYPES

            absent = [pkg for module, pkg in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf"))
                      if not _installed(module)]
            why = (f"{' and '.join(absent)} not installed (CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python "
                   "gguf)") if absent else None
            for file_type in dict.fromkeys(FILE_TYPES[p] for p in precisions if p in FILE_TYPES):
                specs.append(EngineSpec(name, "llamacpp", f"llama.cpp {file_type} flash-attn", file_type,
                                        str(peer_root / "llamacpp" / f"model-{file_type}.gguf"), skipped=why,
                                        max_batch=1))
        else:
            raise BenchError(f"unknown engine {name!r}; --engines takes a comma-separated list of {ENGINE_NAMES}")
    return _unique_labels(specs)


def _unique_labels(specs: list[EngineSpec]) -> list[EngineSpec]:
    """Two fastllm directories of the same kind and precision get their directory name appended."""
    out = []
    for spec in specs:
        same = [s for s in specs if s.label == spec.label]
        if len(same) > 1:
            spec = EngineSpec(**{**spec.to_dict(), "label": f"{spec.label} ({Path(spec.model_path).name})"})
        out.append(spec)
    return out


# -- preparing peers' model files (in the parent, before any timing) --------------------------------------------
def prepare(spec: EngineSpec, hf_dir: Path, progress: Callable[[str], None], *, max_context: int = 2048) -> None:
    out = Path(spec.model_path)
    if spec.kind == "optimum" and not any(out.glob("*.onnx")):
        from optimum.onnxruntime import ORTModelForCausalLM

        progress(f"optimum: exporting {hf_dir} -> {out}")
        ORTModelForCausalLM.from_pretrained(hf_dir, export=True).save_pretrained(out)
    elif spec.kind == "genai" and not (out / "genai_config.json").is_file():
        progress(f"onnxruntime-genai: building {hf_dir} -> {out}")
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                   "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "genai-cache")]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BenchError(f"the onnxruntime-genai builder failed on {hf_dir}: {tail[0]}")
    elif spec.kind == "llamacpp":
        from fastllm.bench.gguf_export import prepare_gguf

        prepare_gguf(hf_dir, out, spec.precision, max_context=max_context, progress=progress)


# -- adapters (run inside the worker process) -------------------------------------------------------------------
class _Stamps:
    """A transformers streamer: generate() calls put() with the prompt first, then with each step's new tokens."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


class TorchRunner:
    """transformers `generate`: KV cache, min_new_tokens = max_new_tokens so EOS cannot end it early. Sampled: top_k=0
    (transformers would otherwise add its default top-k of 50, which the other engines do not apply)."""

    def __init__(self, spec: EngineSpec, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        transformers.logging.set_verbosity_error()
        self.torch = torch
        self.model = self._load(spec, threads)
        config = self.model.config
        eos = getattr(config, "eos_token_id", None)
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else \
            (eos[0] if isinstance(eos, list) else eos if eos is not None else 0)

    def details(self) -> dict:
        return {"attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "torch_threads": self.torch.get_num_threads()}

    def _load(self, spec: EngineSpec, threads: int):
        from transformers import AutoModelForCausalLM

        dtype = {"fp32": self.torch.float32, "bf16": self.torch.bfloat16}[spec.precision]
        return AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype).eval()

    def generate(self, ids: np.ndarray, new_tokens: int, sampling: Sampling, seed: int) -> Timing:
        torch = self.torch
        input_ids = torch.from_numpy(ids)  # (batch, prompt_length) int64
        mask = torch.ones_like(input_ids)
        stamps = _Stamps()
        mode = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0,
            "repetition_penalty": sampling.repetition_penalty}
        torch.manual_seed(seed)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, num_beams=1, use_cache=True, streamer=stamps,
                                      pad_token_id=self.pad_id, **mode)  # (batch, prompt + new)
        return Timing(start, stamps.times, out[0, ids.shape[1]:].tolist())


class OptimumRunner(TorchRunner):
    """Optimum's ORTModelForCausalLM: transformers' generate loop over an ONNX Runtime session."""

    def _load(self, spec: EngineSpec, threads: int):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return ORTModelForCausalLM.from_pretrained(spec.model_path, session_options=options,
                                                   provider="CPUExecutionProvider")


class FastLLMRunner:
    def __init__(self, spec: EngineSpec, threads: int):
        import fastllm

        self.fastllm = fastllm
        # no prefix cache: every run sends the same prompt, and a cached one would skip its prefill (TTFT)
        self.engine = fastllm.load(spec.model_path, threads=threads, prefix_cache=False)

    def details(self) -> dict:
        m = self.engine.manifest
        return {"graph": m.graph.kind, "precision": m.precision, "quantization": m.quantization}

    def generate(self, ids: np.ndarray, new_tokens: int, sampling: Sampling, seed: int) -> Timing:
        prompts = ids.tolist()  # batch of id lists
        params = self.fastllm.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=seed,
                                             temperature=sampling.temperature, top_p=sampling.top_p,
                                             repetition_penalty=sampling.repetition_penalty)
        stamps, first_row = [], []
        start = time.perf_counter()
        for step in self.engine.tokens(prompts, params):  # a tuple with each row's new id
            stamps.append(time.perf_counter())
            first_row.append(step[0])
        return Timing(start, stamps, first_row)


class GenaiRunner:
    def __init__(self, spec: EngineSpec, threads: int):
        import onnxruntime_genai as og

        config_path = Path(spec.model_path) / "genai_config.json"
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        config_path.write_text(json.dumps(config, indent=2))
        self.og = og
        self.model = og.Model(spec.model_path)

    def generate(self, ids: np.ndarray, new_tokens: int, sampling: Sampling, seed: int) -> Timing:
        og = self.og
        batch, length = ids.shape
        params = og.GeneratorParams(self.model)
        search = {"max_length": length + new_tokens, "min_length": length + new_tokens, "do_sample": not sampling.greedy}
        if not sampling.greedy:  # genai's own top_k (default 50) stays: it has no "off"
            search.update(temperature=sampling.temperature, top_p=sampling.top_p,
                          repetition_penalty=sampling.repetition_penalty, random_seed=seed)
        try:
            params.set_search_options(batch_size=batch, **search)
        except Exception:  # noqa: BLE001 -- newer releases take the batch size from append_tokens
            params.set_search_options(**search)
        stamps, first_row = [], []
        start = time.perf_counter()
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
            first_row.append(int(generator.get_next_tokens()[0]))
        return Timing(start, stamps, first_row)


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's C API, as its own server drives it: the prompt in one llama_decode (split
    into micro-batches of 512 inside, llama-server's defaults), then one token per decode, each drawn by llama.cpp's
    sampler chain in C (greedy; or repetition penalty over its default last 64 tokens, temperature, top-p, dist), so
    Python never touches the logits. Flash attention on; the KV cache is cleared before each run."""

    def __init__(self, spec: EngineSpec, threads: int):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=spec.model_path, n_ctx=0, n_batch=2048, n_ubatch=512,
                                   n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)
        self.ctx = self.llm.ctx

    def details(self) -> dict:
        return {"llama_cpp_system_info": self.lib.llama_print_system_info().decode(errors="replace").strip()}

    def _chain(self, sampling: Sampling, seed: int):
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if sampling.greedy:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if sampling.repetition_penalty != 1.0:
            penalty = (64, sampling.repetition_penalty, 0.0, 0.0)  # last 64 tokens (its default), no freq/presence
            if len(lib.llama_sampler_init_penalties.argtypes) == 5:  # llama.cpp builds that also take the vocab size
                penalty = (self.llm.n_vocab(), *penalty)
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(*penalty))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(sampling.temperature))
        if sampling.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(sampling.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def generate(self, ids: np.ndarray, new_tokens: int, sampling: Sampling, seed: int) -> Timing:
        lib, ctx = self.lib, self.ctx
        if ids.shape[0] != 1:
            raise RuntimeError(f"the llama.cpp adapter runs batch 1, got {ids.shape[0]} rows")
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        chain = self._chain(sampling, seed)
        prompt = (lib.llama_token * ids.shape[1])(*ids[0].tolist())
        for token in prompt:  # as llama-server does: the prompt is seen by the penalties
            lib.llama_sampler_accept(chain, token)
        one = (lib.llama_token * 1)()
        stamps, first_row = [], []
        try:
            start = time.perf_counter()
            if lib.llama_decode(ctx, lib.llama_batch_get_one(prompt, len(prompt))) != 0:
                raise RuntimeError("llama_decode failed on the prompt")
            for step in range(new_tokens):
                token = lib.llama_sampler_sample(chain, ctx, -1)  # also accepts it into the chain
                stamps.append(time.perf_counter())
                first_row.append(int(token))
                if step + 1 < new_tokens:
                    one[0] = token
                    if lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1)) != 0:
                        raise RuntimeError(f"llama_decode failed at step {step + 1}")
        finally:
            lib.llama_sampler_free(chain)
        return Timing(start, stamps, first_row)


RUNNERS = {"torch": TorchRunner, "fastllm": FastLLMRunner, "optimum": OptimumRunner, "genai": GenaiRunner,
           "llamacpp": LlamaCppRunner}
