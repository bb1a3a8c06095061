"""What every entry point shares: the config's command line and the user errors.

``add_config_arguments`` declares ``--config-file`` and ``--config``; ``setup_config``
registers the datasets and applies them in that order, then finalises the tree.
``USER_ERRORS`` are the exceptions an entry point reports as one "Error: ..." line.
``training_config_file`` / ``pruned_model_config`` find the config.yaml that comes with
``--load`` weights. train.py, predict.py, prune.py and the bench scripts use them; a user's
own script can too.
Only entry points import this module.
"""
import utils.compat  # noqa: F401  (before anything imports TensorFlow)

import os

from common import ImageReadError
from config import ConfigError, config as cfg, finalize_configs, legacy_values, prune_values
from dataset import DatasetError, DatasetRegistry, DatasetRegistryError, register_builtin_datasets
from utils.training import TrainingDiverged, UserInputError

__all__ = ['USER_ERRORS', 'add_config_arguments', 'setup_config', 'training_config_file',
           'pruned_model_config']

# What an entry point reports as one "Error: ..." line instead of a traceback.
USER_ERRORS = (UserInputError, TrainingDiverged, ConfigError, DatasetRegistryError,
               DatasetError, FileNotFoundError, ImageReadError)


def add_config_arguments(parser):
    """Add ``--config-file PATH`` and ``--config KEY=VALUE ...`` to an argparse parser."""
    parser.add_argument('--config-file', help='a YAML config file, applied before --config')
    parser.add_argument('--config', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides; values are Python literals, e.g. '
                             'MODE_MASK=False')


def setup_config(args, is_training, num_gpus=None, run_config=None):
    """Register datasets, apply ``args.config_file`` then ``args.config``, finalise.

    Args:
        args: anything with ``config_file`` (path or None) and ``config`` (list of str).
        is_training (bool): as `config.finalize_configs`.
        num_gpus (int or None): visible GPUs; detected when None.
        run_config: the config.yaml of the run being resumed or predicted with (None or a
            missing file: a new run). Keys it lacks (it was written before they existed)
            first get the value that keeps the old behaviour (``config.LEGACY_VALUES``,
            e.g. the old anchor layout); --config-file and --config still override them.
            Its PRUNE keys (a pruned model's layer widths) apply too, so a --config-file of
            the unpruned model still builds the layers its weights fit.
    Raises:
        ConfigError: naming the offending key.
    """
    if run_config and os.path.isfile(run_config):
        for key, value in dict(legacy_values(run_config), **prune_values(run_config)).items():
            cfg.set_value(key, value)
    if args.config_file:
        cfg.load_yaml(args.config_file)
    cfg.update_args(args.config)
    register_builtin_datasets(os.path.expanduser(cfg.DATA.BASEDIR), cfg.DATA.COCO_JSON_SPLITS,
                              cfg.DATA.TRAIN, cfg.DATA.DROP_UNUSED_CATEGORIES)
    finalize_configs(is_training=is_training, num_gpus=num_gpus, registry=DatasetRegistry)


def training_config_file(load):
    """The config.yaml that train.py (or prune.py) wrote next to the checkpoint ``load``,
    or None."""
    folder = load if os.path.isdir(load) else os.path.dirname(load)
    path = os.path.join(folder, 'config.yaml')
    return path if os.path.isfile(path) else None


def pruned_model_config(load):
    """The config.yaml of ``load`` when it is a pruned model (prune.py's output: its layer
    widths differ from the config keys'), else None."""
    path = training_config_file(load) if load else None
    return path if path and prune_values(path) else None
