"""Every engine x case is measured in a fresh process, so peak memory and thread pools never leak between engines:

    python -m fastllm.bench.workers JOB.json RESULT.json SPAWNED_AT

The parent (`run_worker`) writes the job (engine, prompt ids, new tokens, sampling mode, threads, runs) and notes the wall-clock
time just before it starts the process; the worker loads the engine, runs the warm-up and the timed runs, and
writes every run's numbers plus load time, cold start and peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastllm.bench.engines import RUNNERS, EngineSpec
from fastllm.bench.metrics import run_metrics, summarise
from fastllm.bench.workload import SAMPLINGS, Sampling

REPO_ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_bytes() -> int:
    """High-water resident memory of this process image. VmHWM starts afresh at exec; getrusage's ru_maxrss does
    not (a child inherits its parent's peak through fork), so it is only the fallback where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_worker(spec: EngineSpec, ids: np.ndarray, *, new_tokens: int, threads: int, runs: int, warmup: int,
               sampling: Sampling = SAMPLINGS["greedy"], seed: int = 0, timeout_s: float | None = None) -> dict:
    """Measure one engine on one batch of prompts (batch, prompt_length) in a new process. Returns its result dict;
    a failure is returned as {"error": "..."} so one broken engine does not end the whole benchmark. `seed` seeds
    the engine's sampling (each run starts from it)."""
    job = {"engine": spec.to_dict(), "prompt_ids": ids.tolist(), "new_tokens": new_tokens, "threads": threads,
           "runs": runs, "warmup": warmup, "sampling": sampling.name, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="fastllm-bench-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        command = [sys.executable, "-m", "fastllm.bench.workers", str(job_path), str(result_path), repr(time.time())]
        try:
            done = subprocess.run(command, env=worker_env(threads), capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        if result_path.is_file():
            return json.loads(result_path.read_text())
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"worker exited with status {done.returncode}: {tail[0]}"}


def measure(job: dict, spawned_at: float) -> dict:
    wall_offset = time.time() - time.perf_counter()  # perf_counter -> wall clock, to compare with spawned_at
    spec = EngineSpec(**job["engine"])
    ids = np.asarray(job["prompt_ids"], dtype=np.int64)  # (batch, prompt_length)
    new_tokens, batch = job["new_tokens"], ids.shape[0]
    sampling, seed = SAMPLINGS[job.get("sampling", "greedy")], job.get("seed", 0)

    t0 = time.perf_counter()
    runner = RUNNERS[spec.kind](spec, job["threads"])
    ready = time.perf_counter()
    rss_after_load = _peak_rss_bytes()

    timed, warm, tokens, first_token = [], [], None, None
    for i in range(job["warmup"] + job["runs"]):
        t = runner.generate(ids, new_tokens, sampling, seed)
        if len(t.stamps) != new_tokens or any(tok is None for tok in t.first_row):
            raise RuntimeError(f"{spec.label} produced {len(t.stamps)} steps, expected exactly {new_tokens}")
        first_token = first_token if first_token is not None else t.stamps[0]
        (warm if i < job["warmup"] else timed).append(run_metrics(t.start, t.stamps, batch=batch))
        tokens = [int(tok) for tok in t.first_row]
    return {
        "load_s": ready + wall_offset - spawned_at,  # process start -> engine ready (interpreter, imports, load)
        "load_engine_s": ready - t0,  # the load call alone
        "cold_start_s": first_token + wall_offset - spawned_at,  # process start -> first token of the first run
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_after_load_bytes": rss_after_load,
        "torch_imported": "torch" in sys.modules,
        "details": runner.details() if hasattr(runner, "details") else {},  # e.g. torch's attention implementation
        "tokens": tokens,  # row 0's new ids in the last run: greedy, a check that engines run the same weights
        "summary": summarise(timed),
        "runs": timed,
        "warmup_runs": warm,
    }


def main(argv: list[str]) -> int:
    job_path, result_path, spawned_at = Path(argv[0]), Path(argv[1]), float(argv[2])
    try:
        result = measure(json.loads(job_path.read_text()), spawned_at)
    except Exception as e:  # noqa: BLE001 -- reported in the results, the benchmark goes on with the next engine
        result = {"error": f"{type(e).__name__}: {e}"}
    result_path.write_text(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
