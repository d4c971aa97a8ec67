"""The config layer: value coercion, config files, `TuneArgumentParser` and the error exit.

Beside `finetune/params.py` (the Params dataclasses), this is what recipes and notebooks import
to turn `--config X k=v ...` into typed params. It imports nothing of the `tune` launcher
(`finetune.cli`) and nothing heavy: the launcher imports it, never the other way round.
"""

from finetune.config.coercion import coerce, describe_type, matches_type
from finetune.config.entry import recipe_entry_point, report_user_errors
from finetune.config.files import CONFIG_DIR, builtin_config_dir, read_config, resolve_config_path
from finetune.config.parser import FOREIGN_KEYS, TuneArgumentParser

__all__ = [
    "CONFIG_DIR",
    "FOREIGN_KEYS",
    "TuneArgumentParser",
    "builtin_config_dir",
    "coerce",
    "describe_type",
    "matches_type",
    "read_config",
    "recipe_entry_point",
    "report_user_errors",
    "resolve_config_path",
]
