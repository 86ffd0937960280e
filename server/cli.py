"""The `loraserve` command line."""

import argparse
import logging
import sys
from pathlib import Path

from server.config import CLUSTER_ONLY
from server.settings_cli import add_settings_flags, flag, settings_from_args
from server.tenancy import commands as keys_commands


def _no_cluster_flags(args: argparse.Namespace) -> None:
    """The cluster's own settings (`--replicas`, `--replica-cpus`, `--stream-interval`) mean nothing to one
    process: refuse them, do not ignore them."""
    given = sorted(flag(name) for name in CLUSTER_ONLY if name in vars(args))
    if given:
        sys.exit(f"loraserve {args.command}: {', '.join(given)} apply to `loraserve cluster` only")


def _serve(args: argparse.Namespace) -> int:
    _no_cluster_flags(args)
    from server.api.logging import configure_logging

    settings = settings_from_args(args)
    configure_logging(settings.log_format)  # before the app's imports, some of which log (alembic, bitsandbytes)
    from server.api.app import create_app
    from server.api.http_server import build_server

    # The engine thread and the event loop share the GIL: a short switch interval keeps the engine's
    # Python between kernels from waiting the default 5 ms each time the loop holds it.
    sys.setswitchinterval(0.0005)
    server = build_server(create_app(settings), settings)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the captured Ctrl-C again once it has shut down
        pass
    return 0 if server.started else 3  # uvicorn's status for a server that failed to start


def _cluster(args: argparse.Namespace) -> int:
    from server.api.logging import configure_logging
    from server.cluster.launch import run

    settings = settings_from_args(args)
    configure_logging(settings.log_format)
    if "shared_limits" not in settings.model_fields_set:  # replicas count each tenant's traffic together
        settings = settings.model_copy(update={"shared_limits": True})
    return run(settings)


def _generate(args: argparse.Namespace) -> int:
    _no_cluster_flags(args)
    from server.engine.engine import LLMEngine
    from server.engine.sequence import SamplingParams

    settings = settings_from_args(args)
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
    add_settings_flags(serve)
    serve.set_defaults(handler=_serve)
    cluster = commands.add_parser(
        "cluster", help="run N engine replicas behind one HTTP endpoint on Ray Serve (RAY_ADDRESS: join that cluster)")
    add_settings_flags(cluster)
    cluster.set_defaults(handler=_cluster)
    generate = commands.add_parser("generate", help="run one prompt offline on the base and adapters")
    add_settings_flags(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--adapter", action="append", help="adapter to use (repeatable; none = base)")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int)
    generate.set_defaults(handler=_generate)
    demo = commands.add_parser("build-demo", help="train the demo base and adapters (CPU, about an hour on 2 cores)")
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
