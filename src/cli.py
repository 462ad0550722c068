"""`voxtral-server` command line: make-tiny, transcribe, chat, demo.

stdout carries only results (one JSON object per chunk); logs go to stderr.
Exit codes: 0 success, 1 the model could not be loaded or generation failed,
2 bad usage, configuration or audio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, Settings, default_config_path, load_settings
from .resources import MissingResource, default_config_file, sample_clip

logger = logging.getLogger("voxtral_server")

DEMO_SCRIPT = (
    "Hello! This is a tiny Voxtral running on your own machine, and every word you see "
    "was streamed the moment it was complete."
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "voxtral-server"


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        ("model", "id"): getattr(args, "model", None),
        ("server", "host"): getattr(args, "host", None),
        ("server", "port"): getattr(args, "port", None),
        ("tts", "engine"): getattr(args, "tts", None),
        ("server", "tls_cert"): getattr(args, "tls_cert", None),
        ("server", "tls_key"): getattr(args, "tls_key", None),
    }
    return load_settings(args.config, overrides)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)


def _log_to_file(settings: Settings) -> None:
    """The server's rotating log file (what operators tail for TTFT lines)."""
    from logging.handlers import RotatingFileHandler

    cfg = settings.logging
    if cfg.file is None:
        return
    path = Path(cfg.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(
        path, maxBytes=cfg.max_bytes, backupCount=cfg.backups, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    logger.info("logging to %s (follow TTFT: voxtral-server ttft %s --follow)", path, path)


def _print_chunks(engine: Any, request: Any) -> int:
    status = "completed"
    for chunk in engine.stream(request):
        print(json.dumps(chunk.to_dict(), ensure_ascii=False), flush=True)
        if chunk.is_final and chunk.totals is not None:
            status = chunk.totals.status
    return 0 if status == "completed" else 1


def _run_file(args: argparse.Namespace, settings: Settings, mode: str) -> int:
    from .models.audio import read_audio_file
    from .models.types import Request
    from .models.voxtral import VoxtralEngine

    audio = read_audio_file(Path(args.file))  # refuse unreadable audio before loading a model
    engine = VoxtralEngine.load(settings)
    try:
        if mode == "transcribe":
            request = Request(
                audio, "transcribe", language=args.language or settings.transcribe.language
            )
        else:
            request = Request(
                audio, "chat", instructions=args.prompt or settings.conversation.instructions
            )
        return _print_chunks(engine, request)
    finally:
        engine.close()


def cmd_make_tiny(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} is not empty (use --force to overwrite)", file=sys.stderr)
        return 2
    tool_call = tuple(args.script_tool) if args.script_tool else None
    try:
        if args.format == "mistral":
            from .models.tiny_mistral import build_tiny_mistral

            if tool_call is not None:
                print("error: --script-tool needs --format transformers", file=sys.stderr)
                return 2
            build_tiny_mistral(out, script=args.script)
        else:
            from .models.tiny import build_tiny

            build_tiny(out, script=args.script, tool_call=tool_call)
    except ValueError as exc:  # a script the model cannot say, arguments that are not JSON
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(str(out))
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _log_config_source(path: Path | None) -> None:
    """Which file the settings came from; with none, where the documented one to copy is."""
    path = path if path is not None else default_config_path()
    if path is not None:
        logger.info("configuration: %s", path)
        return
    try:
        template = str(default_config_file())
    except MissingResource:
        template = "not installed"
    logger.info("configuration: built-in defaults (every key documented in %s)", template)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .api.http_limits import uvicorn_options
    from .api.tls import TlsError, tls_options

    settings = _settings(args)
    try:
        tls = tls_options(settings.server)
    except TlsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host, port = settings.server.host, settings.server.port
    if host not in LOOPBACK and settings.server.auth_token is None and not args.insecure:
        print(
            f"error: refusing to listen on {host} without server.auth_token: anyone who can "
            "reach it could use the model. Set server.auth_token, bind 127.0.0.1 and use "
            "`ssh -L`, or pass --insecure.",
            file=sys.stderr,
        )
        return 2
    # The event loop shares the GIL with the VAD and engine threads; when it wants the GIL
    # back it waits up to the switch interval (5 ms by default): 1 ms keeps every session's
    # events and /healthz prompt while those threads work.
    sys.setswitchinterval(0.001)
    _log_to_file(settings)
    _log_config_source(args.config)
    scheme = "https" if tls else "http"
    logger.info("serving on %s://%s:%d/ (model %s)", scheme, host, port, settings.model.id)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,  # keep our logging setup
        timeout_graceful_shutdown=5,
        **uvicorn_options(settings),  # keep-alive, request-header deadline, WebSocket sizes
        **tls,
    )
    return 0


def demo_checkpoint() -> Path:
    from .models.tiny import build_tiny

    model_dir = cache_dir() / "tiny-demo"
    if not (model_dir / "config.json").is_file():
        logger.info("building the tiny scripted demo checkpoint in %s", model_dir)
        build_tiny(model_dir, script=DEMO_SCRIPT)
    return model_dir


def cmd_demo(args: argparse.Namespace) -> int:
    args.model = str(demo_checkpoint())
    if args.tts is None:
        import shutil

        args.tts = "espeak" if shutil.which("espeak-ng") else None
        if args.tts is None:
            logger.info("espeak-ng is not installed: the demo answers in text only")
    if args.clip is not None:  # no server: stream the answer to one clip and exit
        args.file = args.clip or str(sample_clip())
        return _run_file(args, _settings(args), "chat")
    return cmd_serve(args)


def cmd_ttft(args: argparse.Namespace) -> int:
    from . import ttft

    try:
        return ttft.run(Path(args.logfile), sys.stdout, follow=args.follow, last=args.last)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxtral-server", description="Real-time speech-to-speech server for Voxtral."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, model: bool = True) -> None:
        p.add_argument(
            "--config",
            type=Path,
            help="config file (default: $VOXTRAL_CONFIG, else ./config.yaml, else the defaults)",
        )
        if model:
            p.add_argument("--model", help="hub id or local folder (overrides model.id)")

    p = sub.add_parser("make-tiny", help="write an offline tiny random Voxtral checkpoint")
    p.add_argument("dir", help="output folder")
    p.add_argument("--script", help="make greedy decoding answer exactly this text")
    p.add_argument(
        "--script-tool",
        nargs=2,
        metavar=("NAME", "ARGUMENTS"),
        help="make greedy decoding answer a user turn with a call of function NAME with "
        "ARGUMENTS (a JSON object), as Voxtral writes one; --script then answers the "
        "function's result",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.add_argument(
        "--format",
        choices=("transformers", "mistral"),
        default="transformers",
        help="transformers: for model.id (default); mistral: params.json + "
        "consolidated.safetensors + tekken.json, what `vllm serve --load-format mistral` reads",
    )
    p.set_defaults(func=cmd_make_tiny, config=None)

    p = sub.add_parser(
        "transcribe", help="print the transcription of FILE, one JSON chunk per line"
    )
    common(p)
    p.add_argument("file", help="audio file (wav, flac, ogg, mp3, ...; any rate and channels)")
    p.add_argument("--language", help="ISO 639-1 code (default: transcribe.language)")
    p.set_defaults(func=lambda a: _run_file(a, _settings(a), "transcribe"))

    p = sub.add_parser("chat", help="print the model's answer to FILE, one JSON chunk per line")
    common(p)
    p.add_argument("file", help="audio file (wav, flac, ogg, mp3, ...; any rate and channels)")
    p.add_argument("--prompt", help="text sent with the audio (default: conversation.instructions)")
    p.set_defaults(func=lambda a: _run_file(a, _settings(a), "chat"))

    def server_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="bind address (overrides server.host)")
        p.add_argument("--port", type=int, help="TCP port (overrides server.port)")
        p.add_argument(
            "--insecure", action="store_true", help="allow a non-loopback host without a token"
        )
        p.add_argument(
            "--tls-cert", metavar="FILE", help="PEM certificate: serve https/wss (server.tls_cert)"
        )
        p.add_argument(
            "--tls-key", metavar="FILE", help="PEM private key for --tls-cert (server.tls_key)"
        )
        p.add_argument(
            "--tts",
            choices=["none", "espeak", "kokoro"],
            help="speak the answers (tts.engine); demo default: espeak if espeak-ng is installed",
        )

    p = sub.add_parser("serve", help="run the realtime server (WebSocket + WebRTC + web page)")
    common(p)
    server_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="serve a tiny offline scripted model (no GPU, no hub)")
    common(p, model=False)
    server_flags(p)
    p.add_argument(
        "--clip",
        nargs="?",
        const="",
        help="instead of serving, stream the answer to one audio file (default: the sample)",
    )
    p.set_defaults(func=cmd_demo, prompt=None)

    p = sub.add_parser("ttft", help="p50/p95/p99 of the per-turn TTFT lines of a server log")
    p.add_argument("logfile", help="the server's log file (logging.file)")
    p.add_argument("--follow", action="store_true", help="keep the table live, like tail -f")
    p.add_argument("--last", type=int, help="only the last N turns")
    p.set_defaults(func=cmd_ttft, config=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .models.audio import AudioInputError
    from .models.types import EngineError

    try:
        level = load_settings(args.config).logging.level
    except ConfigError as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    _setup_logging(level)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except (AudioInputError, MissingResource) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
