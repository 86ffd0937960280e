"""The `loraserve` command line."""

import argparse
import logging
import sys
from pathlib import Path

from server.config import Settings
from server.tenancy import commands as keys_commands


def _lora_arg(text: str) -> str:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return text


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="local Hugging Face model directory")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--max-loras", type=int, dest="max_loras", help="adapter slots on the device")
    parser.add_argument("--max-lora-rank", type=int, dest="max_lora_rank")
    parser.add_argument("--torch-threads", type=int, dest="torch_threads",
                        help="threads of the forward pass (default: one per core)")
    parser.add_argument("--lora", action="append", type=_lora_arg, metavar="NAME=PATH",
                        help="register a PEFT adapter directory (repeatable)")


def _settings(args: argparse.Namespace) -> Settings:
    """CLI flags override environment variables, which override defaults."""
    overrides = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import create_app
    from server.api.logging import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_format)
    # The engine thread and the event loop share the GIL: a short switch interval keeps the engine's
    # Python between kernels from waiting the default 5 ms each time the loop holds it.
    sys.setswitchinterval(0.0005)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                timeout_graceful_shutdown=int(settings.shutdown_grace_seconds))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from server.engine.engine import LLMEngine
    from server.engine.sequence import SamplingParams

    settings = _settings(args)
    engine = LLMEngine.from_settings(settings)
    for pair in settings.lora:
        name, _, path = pair.partition("=")
        engine.load_adapter(name, Path(path))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    adapters = args.adapter or [None]
    results = engine.generate([args.prompt] * len(adapters), params, adapters)
    for adapter, result in zip(adapters, results):
        print(f"[{adapter or 'base'}] {result.text!r} ({result.finish_reason.value})")
    return 0


def _build_demo(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from server.demo.train import BuildPlan, main

    names = {f.name for f in fields(BuildPlan)}
    overrides = {k: v for k, v in vars(args).items() if v is not None and k in names}
    return main(BuildPlan(**overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    _engine_flags(serve)
    serve.add_argument("--adapters-dir", type=Path, dest="adapters_dir", help="adapter store directory")
    serve.add_argument("--catalogue-url", dest="catalogue_url", help="SQLAlchemy URL of the catalogue")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--served-model-name", dest="served_model_name")
    serve.add_argument("--max-num-seqs", type=int, dest="max_num_seqs")
    serve.add_argument("--kv-cache-memory", dest="kv_cache_memory", help="bytes, e.g. 2GB")
    serve.add_argument("--host-cache-memory", dest="host_cache_memory", help="bytes, e.g. 1GB")
    serve.add_argument("--max-upload-size", dest="max_upload_size", help="bytes, e.g. 512MB")
    serve.add_argument("--log-format", choices=["json", "text"], dest="log_format")
    serve.add_argument("--auth", choices=["auto", "on", "off"], help="require API keys (default auto: on when a key exists)")
    serve.add_argument("--admin-key", dest="admin_key", help="the first admin key (prefer LORASERVE_ADMIN_KEY)")
    serve.set_defaults(handler=_serve)
    generate = commands.add_parser("generate", help="run one prompt offline on the base and adapters")
    _engine_flags(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--adapter", action="append", help="adapter to use (repeatable; none = base)")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int)
    generate.set_defaults(handler=_generate)
    demo = commands.add_parser("build-demo", help="train the demo base and adapters (CPU, a few minutes)")
    demo.add_argument("--base-dir", type=Path, dest="base_dir", help="default demo/base")
    demo.add_argument("--adapters-dir", type=Path, dest="adapters_dir", help="default adapters")
    demo.add_argument("--base-steps", type=int, dest="base_steps")
    demo.add_argument("--adapter-steps", type=int, dest="adapter_steps")
    demo.set_defaults(handler=_build_demo)
    keys_commands.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
