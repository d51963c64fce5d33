"""The Pretraining Lab's interactive commands of `lab` (lab.cli adds them):

lab train [key=value ...]     train one configuration (the profile's baby GPT plus overrides), with a
                              progress bar; Ctrl-C leaves a checkpoint and the same command resumes it
lab board                     TensorBoard over the cache: every run's curves, live while it trains
lab playground                the checkpoint playground (a Gradio app): generate and look inside
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from lab.profiles import PROFILES

TRAIN_HELP = """Train one configuration: the profile's baby GPT on a corpus, with any model or training
setting overridden as key=value, e.g.

  lab train --profile smoke
  lab train n_layer=6 n_embd=192 pos=rope max_steps=3000 lr=6e-4

The run is cached like the hypotheses' runs ($LAB_CACHE/runs/<key>, the same key for the same
settings and code), so a hypothesis that needs it later reuses it, and `lab board` and
`lab playground` show it. Ctrl-C stops after the current step and writes a checkpoint; the same
command resumes it exactly. --out DIR trains into a folder of your own instead."""


def _cache_root() -> Path:
    return Path(os.environ.get("LAB_CACHE") or Path.home() / ".cache" / "llm-lab")


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def split_overrides(items: list[str]) -> tuple[dict, dict]:
    """key=value items -> (GPTConfig overrides, TrainConfig overrides); unknown keys are a
    ValueError listing the valid ones."""
    from lab.models import GPTConfig
    from lab.train import TrainConfig

    model_keys = {f.name for f in fields(GPTConfig)} - {"vocab_size"}
    train_keys = {f.name for f in fields(TrainConfig)} - {"seed"}
    model, train = {}, {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        if key in model_keys:
            model[key] = _value(raw)
        elif key in train_keys:
            train[key] = _value(raw)
        else:
            raise ValueError(
                f"unknown setting {key!r}; model settings: {', '.join(sorted(model_keys))}; "
                f"training settings: {', '.join(sorted(train_keys))} (the seed is --seed)"
            )
    return model, train


def _checkpoint_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "last" / "config.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cmd_train(args, extra: list[str]) -> int:
    from lab.session import Lab
    from lab.train import TrainingDivergedError, train

    try:
        model_over, train_over = split_overrides(args.overrides)
        lab = Lab(args.profile)
        data = lab.data(args.corpus, args.tokenizer)
        mc = lab.model_config(data, **model_over)
        tc = lab.train_config(seed=args.seed, **train_over)
    except ValueError as exc:
        print(f"lab train: {exc}", file=sys.stderr)
        return 2
    folder = Path(args.out) if args.out else lab.run_dir(data, mc, seed=args.seed, **train_over)
    done = (folder / "done").exists() and not args.out
    step = _checkpoint_step(folder)
    print(f"lab train: {lab.profile.name} profile, {mc.n_layer} layers x {mc.n_embd} wide, {tc.max_steps} steps")
    if done:
        print(f"lab train: already trained (cached): {folder}")
    elif step is not None:
        print(f"lab train: resuming {folder} from step {step}")
    else:
        print(f"lab train: training into {folder}")
    try:
        if args.out:
            result = train(mc, tc, data, out_dir=folder, resume=step is not None, progress=True)
        else:
            result = lab.pretrain(data, mc, seed=args.seed, **train_over)
    except KeyboardInterrupt:
        step = _checkpoint_step(folder)
        where = f"a checkpoint at step {step} is in {folder / 'last'}" if step is not None else "no checkpoint yet"
        print(f"\nlab train: interrupted; {where}. Run the same command to resume.", file=sys.stderr)
        return 130
    except TrainingDivergedError as exc:
        print(f"lab train: {exc}", file=sys.stderr)
        return 1
    print(
        f"lab train: {result.steps} steps, validation loss {result.final_val_loss:.4f} "
        f"(best {result.best_val_loss:.4f}), {result.tokens_per_s:,.0f} tokens/s, {result.wall_time_s:.0f} s"
    )
    print(f"lab train: checkpoints in {folder} (last/, best/); curves: `lab board`; generate: `lab playground`")
    return 0


def board_command(logdir: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host, "--port", str(port)]


def cmd_board(args, extra: list[str]) -> int:
    logdir = Path(args.logdir) if args.logdir else _cache_root()
    cmd = board_command(logdir, args.host, args.port)
    if args.print_only:
        print(shlex.join(cmd))
        return 0
    if importlib.util.find_spec("tensorboard") is None:
        print(
            "lab board: TensorBoard is not installed (bash install.sh installs it); the command is:\n  "
            + shlex.join(cmd),
            file=sys.stderr,
        )
        return 1
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"lab board: TensorBoard over {logdir} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def cmd_playground(args, extra: list[str]) -> int:
    from lab.playground import PlaygroundError, launch

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    print(f"lab playground: http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        launch(host=args.host, port=args.port, root=args.cache)
    except PlaygroundError as exc:
        print(f"lab playground: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def add_parsers(sub) -> None:
    """Add `train`, `board` and `playground` to the `lab` command's subparsers."""
    import argparse

    p = sub.add_parser(
        "train",
        help="train one configuration with a progress bar (Ctrl-C checkpoints; the same command resumes)",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model or training settings, e.g. n_layer=6")
    p.add_argument("--profile", choices=sorted(PROFILES), help="scale (default: $LAB_PROFILE, else gpu/cpu)")
    p.add_argument("--corpus", default="tinyshakespeare", help="corpus (default tinyshakespeare)")
    p.add_argument("--tokenizer", default="char", help="char, bpe, cl100k or gpt2 (default char)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="train into this folder instead of the cache (resumes from its last/)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("board", help="TensorBoard over the cached runs (live while they train)")
    p.add_argument("--logdir", help="folder to show (default: $LAB_CACHE, every trainer's runs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6006)
    p.add_argument("--print", dest="print_only", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=cmd_board)

    p = sub.add_parser("playground", help="the checkpoint playground: generate from cached runs and look inside")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--cache", help="the cache whose runs it lists (default $LAB_CACHE)")
    p.set_defaults(func=cmd_playground)
