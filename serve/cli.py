"""``fusionserve serve | generate | bench | dynamo-worker`` (also ``python -m serve``)."""
from __future__ import annotations

import argparse
import asyncio
import sys

ENGINE_OPTIONS = {  # flag -> (EngineConfig field, type, help)
    "--device": ("device", str, "cpu, cuda, cuda:1 ..."),
    "--dtype": ("dtype", str, "float32 | bfloat16 | float16 (default: bfloat16 on CUDA, float32 else)"),
    "--attention-backend": ("attention_backend", str, "auto | cpu | torch | triton | flash"),
    "--block-size": ("block_size", int, "KV block size in tokens"),
    "--num-blocks": ("num_blocks", int, "KV pool size in blocks (overrides --kv-cache-memory)"),
    "--kv-cache-memory": ("kv_cache_memory", float, "KV pool: bytes (>1) or a fraction of free memory"),
    "--max-num-seqs": ("max_num_seqs", int, "requests running at once"),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int, "token budget of one step"),
    "--max-model-len": ("max_model_len", int, "context length (default: the checkpoint's)"),
    "--seed": ("seed", int, "engine seed"),
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face-format Fuyu or Gemma 4 Unified folder (default: the bundled samples/gemma4-shapes)")
    for flag, (_, kind, text) in ENGINE_OPTIONS.items():
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    p.add_argument("--no-chunked-prefill", action="store_true", help="disable chunked prefill")
    p.add_argument("--no-pack-linears", action="store_true",
                   help="CPU: one copy of each linear weight (MKL's GEMM only; slower steps, less memory)")
    p.add_argument("--compile-decode", action="store_true",
                   help="CPU: torch.compile the decode step at start (about 1-2.5 min; faster decode steps)")


def engine_config(args: argparse.Namespace):
    from pipeline.config import EngineConfig

    options = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in ENGINE_OPTIONS.items()}
    options = {k: v for k, v in options.items() if v is not None}
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    if args.no_chunked_prefill:
        options["enable_chunked_prefill"] = False
    if args.no_pack_linears:
        options["pack_linears"] = False
    if args.compile_decode:
        options["compile_decode"] = True
    return EngineConfig(model=args.model, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionserve", description="Serve early-fusion multimodal models (Fuyu)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require this key (default: env FUSIONSERVE_API_KEY)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name requests must give (default: the model folder's name)")
    serve.add_argument("--max-upload-mb", type=float, default=64.0, help="largest request body")
    serve.add_argument("--max-images", type=int, default=16, help="images per request")
    serve.add_argument("--max-videos", type=int, default=4, help="videos per request")
    serve.add_argument("--max-audios", type=int, default=4, help="audio clips per request (families that take audio)")
    serve.add_argument("--max-queue-len", type=int, default=256,
                       help="requests waiting beyond --max-num-seqs before 429")
    serve.add_argument("--allowed-media-host", action="append", default=[],
                       help="host whose http(s) image/video URLs may be fetched (repeatable; default none)")
    serve.add_argument("--allowed-media-port", action="append", type=int, default=[],
                       help="port media may be fetched from (repeatable; default 80 and 443)")
    serve.add_argument("--allow-private-media-addresses", action="store_true",
                       help="let media hosts resolve to loopback / private / link-local addresses (trusted networks)")
    serve.add_argument("--torch-threads", type=int, default=None,
                       help="torch intra-op threads (default: the CPUs left after the media workers)")
    serve.add_argument("--media-workers", type=int, default=None,
                       help="media decoding workers (default: a quarter of the CPUs, 1 to 4)")
    serve.add_argument("--max-num-reading", type=int, default=4,
                       help="requests reading their body or decoding media at once; others wait, then 429")
    serve.add_argument("--max-step-failures", type=int, default=3,
                       help="failing engine steps in a row before the engine is declared dead (/health 503)")
    serve.add_argument("--no-demo", action="store_true", help="do not mount the Gradio demo at /demo")
    serve.add_argument("--log-level", default="info")

    gen = sub.add_parser("generate", help="run one prompt and print the answer as it streams")
    _add_model_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    gen.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")

    bench = sub.add_parser("bench", help="load a running server with concurrent streaming clients")
    bench.add_argument("--url", default="http://127.0.0.1:8000", help="a started server (loopback)")
    bench.add_argument("--clients", type=int, default=64)
    bench.add_argument("--requests", type=int, default=256, help="total requests (bounded)")
    bench.add_argument("--duration-s", type=float, default=60.0, help="stop sending after this")
    bench.add_argument("--max-tokens", type=int, default=32)
    bench.add_argument("--image-size", type=int, default=128, help="side of the random image each request sends")
    bench.add_argument("--api-key", default=None)
    return parser


def _serve(args) -> int:
    import uvicorn

    from serve.app import create_app
    from serve.protocol import ServerConfig
    from serve.threads import apply_thread_budget, available_cpus, thread_budget

    engine = engine_config(args)
    budget = thread_budget(available_cpus(), engine.video_sampling.decoder_threads, args.torch_threads,
                           args.media_workers)
    names = {"model_name": args.served_model_name} if args.served_model_name else {}
    config = ServerConfig(api_key=args.api_key, **names, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                          max_images=args.max_images, max_videos=args.max_videos,
                          max_audios=args.max_audios, max_queue_len=args.max_queue_len,
                          allowed_media_hosts=tuple(args.allowed_media_host),
                          allowed_media_ports=tuple(args.allowed_media_port) or ServerConfig.allowed_media_ports,
                          allow_private_media_addresses=args.allow_private_media_addresses,
                          num_preprocess_workers=budget.media_workers, max_num_reading=args.max_num_reading,
                          max_step_failures=args.max_step_failures)
    apply_thread_budget(budget)
    print(f"fusionserve: threads: {budget.describe()}", flush=True)
    app = create_app(engine, config)
    base_url = f"http://{args.host}:{args.port}"
    if args.no_demo:
        where = "demo off (--no-demo)"
    elif config.api_key:
        where = "demo off (it has no login; start without --api-key to get it)"
    else:
        try:
            from serve.demo import DEMO_PATH, mount_demo
        except ImportError as exc:
            where = f"demo off ({exc.name} is missing: pip install 'fusionserve[demo]')"
        else:
            mount_demo(app)
            where = f"demo on {base_url}{DEMO_PATH}"
    print(f"fusionserve: API on {base_url}, {where}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=15)
    return 0


def _generate(args) -> int:
    from pipeline.engine import Engine
    from pipeline.pipeline import Pipeline

    pipe = Pipeline(Engine(engine_config(args)))
    chunk = None
    for chunk in pipe.stream(args.prompt, images=args.image, videos=args.video, max_tokens=args.max_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.sample_seed):
        print(chunk.text, end="", flush=True)
    print()
    if chunk is not None:
        print(f"[{chunk.finish_reason}; {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} "
              "generated tokens]", file=sys.stderr)
    return 0


def _bench(args) -> int:
    from serve.load import LoadSpec, run_load

    spec = LoadSpec(url=args.url, num_clients=args.clients, num_requests=args.requests, duration_s=args.duration_s,
                    max_tokens=args.max_tokens, image_size=args.image_size, api_key=args.api_key)
    result = asyncio.run(run_load(spec))
    print(result.summary())
    return 0 if result.num_errors == 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dynamo-worker"]:  # NVIDIA Dynamo backend worker: its own options, imported only here
        from serve.dynamo.worker import main as dynamo_worker

        return dynamo_worker(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"serve": _serve, "generate": _generate, "bench": _bench}[args.command](args)
    except ValueError as exc:  # bad options, bad model folder, bad media
        print(f"fusionserve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
