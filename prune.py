#!/usr/bin/env python
"""Prune a trained model: drop the output channels of small norm, write a narrower model.

    python prune.py --load train_log/demo --threshold 0.3 --output pruned/demo_t03
    python prune.py --load train_log/demo --threshold 0.5 --output pruned/x \\
        --equalization arithmetic_mean --exclude '^fpn/' --granularity 16
    python train.py --load pruned/demo_t03 --logdir train_log/demo_t03 \\
        --config TRAIN.WEIGHT_DECAY=0. 'TRAIN.LR_SCHEDULE=[450,550,600]'

Every conv / FC layer's output channels are scored by their kernel's L2 norm over the
layer's largest, or with --criterion gamma by their norm layer's |gamma| (pruning.py;
layers whose outputs are added share one channel set, modeling/channel_spaces.py); channels
scoring at least --threshold stay, rounded up to a multiple of --granularity and to at
least --min-channels; GroupNorm groups are kept or dropped whole. TRAIN.NORM_L1 > 0 (an L1
penalty on the gammas) over a long schedule drives unneeded gammas to 0 for --criterion
gamma. The RPN's and the heads' class / box outputs and the mask predictor are never
pruned; --exclude keeps more layers whole (their channels: their residual branches may
still go by --drop-blocks).

--drop-blocks G removes whole residual branches first: every ResNet block whose last norm
layer has all |gamma| <= G computes relu(shortcut + beta) instead (PRUNE.DROPPED_BLOCKS).
Such a branch adds gamma x (a unit-variance signal) + beta, so this changes the block's
output by at most ~G per channel; a frozen stage's zero-initialised ends (gamma 0) go
exactly; --keep-blocks REGEX keeps the blocks it matches. Each branch's largest |gamma| is
printed, to choose G by. The channels are then pruned as above in what remains
(--threshold 0: none). The demo's recipe, in one call (README.md, "Pruning"):

    python prune.py --load train_log/demo --drop-blocks 0.5 --threshold 0.99 \
        --min-channels 32 --exclude '^(group|conv0|fpn|rpn)|fastrcnn/fc' --output pruned/d

--output gets the pruned weights (a checkpoint: ``--load OUTPUT`` reads it) and its
config.yaml: the model's config (the one next to --load, unless --config-file is given)
with PRUNE.CHANNELS, the new layer widths, which the model builders read. train.py --load
OUTPUT retrains it (weight decay off, as TAO advises: TRAIN.WEIGHT_DECAY=0.), predict.py
--load OUTPUT predicts, evaluates and exports it. A table per stage gives the channels,
parameters and FLOPs (at PREPROC.TEST_SHORT_EDGE_SIZE x PREPROC.MAX_SIZE) before and after.

Exit status: 1 with one "Error: ..." line for a bad argument, config, --load path or a
non-empty --output.
"""
import utils.compat  # noqa: F401  (must come before TensorFlow)

import argparse
import os
import sys

from cli import USER_ERRORS, add_config_arguments, setup_config, training_config_file
from config import config as cfg


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one "Error: ..." line and exit status 1."""

    def error(self, message):
        print('Error: {}'.format(message), file=sys.stderr)
        sys.exit(1)


def parse_args(argv=None):
    from pruning import CRITERIA, EQUALIZATIONS
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--load', help='the trained model: a checkpoint directory (a train.py '
                                  'logdir) or prefix, or an .npz file (required)')
    p.add_argument('--threshold', type=float,
                   help='keep channels whose normalised norm is >= this, in [0, 1] (required)')
    p.add_argument('--output', help='folder for the pruned model (new or empty; required)')
    p.add_argument('--granularity', type=int, default=8,
                   help='kept channel counts are rounded up to a multiple of this')
    p.add_argument('--min-channels', type=int, default=16, help='no layer keeps fewer')
    p.add_argument('--equalization', default='union', choices=list(EQUALIZATIONS),
                   help='how layers whose outputs are added agree on their channels')
    p.add_argument('--criterion', default='kernel', choices=CRITERIA,
                   help='score channels by their kernel norm (TAO), or by |gamma| of their '
                        'norm layer (for models trained with TRAIN.NORM_L1)')
    p.add_argument('--drop-blocks', type=float, metavar='G',
                   help='remove every residual branch whose last norm layer has all |gamma| '
                        '<= G (absolute; e.g. 0.05)')
    p.add_argument('--keep-blocks', metavar='REGEX',
                   help='residual blocks (e.g. "^group3/|group1/block0") --drop-blocks keeps')
    p.add_argument('--exclude', metavar='REGEX',
                   help='layers (variable scopes, e.g. "^fpn/|rpn") whose channels stay whole')
    add_config_arguments(p)
    args = p.parse_args(argv)
    missing = [f for f in ('load', 'threshold', 'output') if getattr(args, f) is None]
    if missing:
        p.error('missing ' + ', '.join('--' + f for f in missing))
    return args


def check_args(args):
    """Raise UserInputError for values argparse cannot check."""
    from utils.training import UserInputError
    if not 0. <= args.threshold <= 1.:
        raise UserInputError('--threshold must be in [0, 1] (norms are divided by each '
                             'layer\'s largest), got {}.'.format(args.threshold))
    if args.drop_blocks is not None and args.drop_blocks < 0:
        raise UserInputError('--drop-blocks must be >= 0 (a |gamma| bound), got {}.'.format(
            args.drop_blocks))
    if args.keep_blocks is not None and args.drop_blocks is None:
        raise UserInputError('--keep-blocks names blocks for --drop-blocks to keep; give '
                             '--drop-blocks too.')
    if args.granularity < 1 or args.min_channels < 1:
        raise UserInputError('--granularity and --min-channels must be >= 1.')
    if os.path.isdir(args.output) and os.listdir(args.output):
        raise UserInputError('--output: "{}" exists and is not empty.'.format(args.output))


def prune(args):
    """Read, prune, write, print the summary."""
    import pruning
    from modeling.channel_spaces import channel_spaces
    from utils.training import UserInputError, read_weights
    options = pruning.PruneOptions(args.threshold, args.granularity, args.min_channels,
                                   args.equalization,
                                   pruning.compile_regex(args.exclude, '--exclude'),
                                   args.criterion)
    keep_blocks = pruning.compile_regex(args.keep_blocks, '--keep-blocks')
    weights = read_weights(args.load)
    _, cells = channel_spaces()  # every layer the model has now: the table's "before"
    dropped = []
    if args.drop_blocks is not None:
        if cfg.BACKBONE.NORM == 'None':
            raise UserInputError('--drop-blocks needs a backbone with norm layers (it reads '
                                 'their gamma); BACKBONE.NORM is None.')
        gammas = pruning.branch_gammas(weights)
        if keep_blocks and not any(keep_blocks.search(b) for b in gammas):
            raise UserInputError('--keep-blocks {!r} matches no residual block: {}.'.format(
                args.keep_blocks, ', '.join(gammas) or 'none has its branch'))
        dropped = pruning.blocks_to_drop(weights, args.drop_blocks, keep_blocks)
        print('largest |gamma| ending each residual branch (* removed): ' + ', '.join(
            '{} {:.3f}{}'.format(b, g, '*' if b in dropped else '') for b, g in gammas.items()))
    with cfg.override({'PRUNE.DROPPED_BLOCKS': list(cfg.PRUNE.DROPPED_BLOCKS) + dropped}):
        spaces, _ = channel_spaces()
    result = pruning.prune_weights(pruning.drop_blocks(weights, dropped), spaces, options,
                                   cfg.PRUNE.GN_GROUPS)
    widths = pruning.write_pruned_model(result.weights, args.output, result.channels,
                                        result.gn_groups, dropped)
    print('\n'.join(pruning.format_summary(pruning.summary_rows(weights, result.weights,
                                                                cells))))
    print('prune.py: {} residual branches removed{}, {} layers narrower ({} in '
          'PRUNE.CHANNELS), {} GroupNorm group counts changed; pruned model in {}'.format(
              len(dropped), ' ({})'.format(', '.join(dropped)) if dropped else '',
              len(result.channels), len(widths), len(result.gn_groups), args.output))
    # train.py recognises a pruned model by its PRUNE keys; with none, say how to retrain
    config_file = '' if widths or dropped or cfg.PRUNE.DROPPED_BLOCKS else \
        ' --config-file {}'.format(os.path.join(args.output, 'config.yaml'))
    print('Retrain it: python train.py --load {}{} --logdir LOGDIR --config '
          'TRAIN.WEIGHT_DECAY=0.'.format(args.output, config_file))
    return 0


def main(args):
    """Prune; a user error ends with one "Error: ..." line and exit status 1."""
    try:
        check_args(args)
        run_config = training_config_file(args.load)
        if args.config_file is None:  # the model's own config, as predict.py does
            args.config_file = run_config
        setup_config(args, is_training=False, run_config=run_config)
        return prune(args)
    except USER_ERRORS as e:
        print('Error: {}'.format(e), file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main(parse_args()))
