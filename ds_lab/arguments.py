"""DeepSpeed's command-line arguments: `ds_lab.add_config_arguments(parser)`.

    parser = argparse.ArgumentParser()
    parser = ds_lab.add_config_arguments(parser)      # --deepspeed, --deepspeed_config, ...
    args = parser.parse_args()
    engine, *_ = ds_lab.initialize(args=args, model=model)   # reads args.deepspeed_config

The group is DeepSpeed 0.19.8's (deepspeed/__init__.py `_add_core_arguments`), argument for argument:
`--deepspeed` (a flag for the script's own use; it changes nothing in the engine), `--deepspeed_config`
(the JSON path `initialize` reads), and the deprecated `--deepscale` / `--deepscale_config`, which
`initialize` still honours (a warning, then used as `deepspeed_config`). DeepSpeed 0.19.8 has no
`--deepspeed_mpi` any more, so neither does ds_lab.

One addition: DeepSpeed's launcher passes `--local_rank=N` to every script, and DeepSpeed's tutorials
add that argument themselves. When the parser does not define it yet, `add_config_arguments` adds it
(default -1), so a script that forgot it still parses the launcher's command line; a parser that
already has it is left alone.
"""
from __future__ import annotations

import argparse

__all__ = ["add_config_arguments"]


def _add_core_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (a flag for user code, no impact on DeepSpeed backend)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true",
                       help="Deprecated enable DeepSpeed (a flag for user code, no impact on DeepSpeed backend)")
    group.add_argument("--deepscale_config", default=None, type=str,
                       help="Deprecated DeepSpeed json configuration file.")
    return parser


def _defines(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in action.option_strings for action in parser._actions)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's argument group to `parser` (and `--local_rank` if it lacks one); returns it."""
    if not isinstance(parser, argparse.ArgumentParser):
        raise TypeError(f"add_config_arguments takes an argparse.ArgumentParser, got {type(parser).__name__}")
    parser = _add_core_arguments(parser)
    if not _defines(parser, "--local_rank"):
        parser.add_argument("--local_rank", type=int, default=-1,
                            help="local rank passed by the launcher (added by ds_lab when the script has none)")
    return parser


def config_from_args(args, config, config_params):
    """DeepSpeed's rules (deepspeed.initialize) for where the config comes from: `config`, else the
    legacy `config_params`; `args.deepscale_config` (deprecated) moves into `args.deepspeed_config`;
    `args.deepspeed_config` and `config` together are an error. Returns the config (dict or path)."""
    import warnings

    from ds_lab.config import ConfigError

    if config is None and config_params is not None:
        config = config_params
    if getattr(args, "deepscale_config", None) is not None:
        warnings.warn("--deepscale_config is deprecated, please use --deepspeed_config", stacklevel=3)
        if getattr(args, "deepspeed_config", None) is not None:
            raise ConfigError("args has both deepscale_config and deepspeed_config; keep --deepspeed_config only")
        args.deepspeed_config, args.deepscale_config = args.deepscale_config, None
    arg_config = getattr(args, "deepspeed_config", None) if args is not None else None
    if arg_config is not None and config is not None:
        raise ConfigError("config given twice: as args.deepspeed_config and as config=; keep one")
    config = config if config is not None else arg_config
    if config is None:
        raise ConfigError("no config: pass config= (a dict or a JSON path), or args with "
                          "args.deepspeed_config (--deepspeed_config from ds_lab.add_config_arguments)")
    return config
