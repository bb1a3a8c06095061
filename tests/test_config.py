"""config.py: parsing, unknown keys, types, sealing/freezing, validation, YAML round trip."""
import os
import subprocess
import sys

import pytest

import config_defaults
from config import ConfigError, config as cfg, finalize_configs, parse_value
from dataset import DatasetRegistry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finalize(is_training, num_gpus):
    finalize_configs(is_training=is_training, num_gpus=num_gpus, registry=DatasetRegistry)


@pytest.fixture
def toy_dataset():
    DatasetRegistry.register('cfgtest_train', lambda: None)
    DatasetRegistry.register_metadata('cfgtest_train', 'class_names', ['cat', 'dog'])
    return 'cfgtest_train'


def test_parse_value_literals_and_bare_words():
    assert parse_value('3') == 3
    assert parse_value('0.5') == 0.5
    assert parse_value('[1, 2]') == [1, 2]
    assert parse_value("('a',)") == ('a',)
    assert parse_value('True') is True
    assert parse_value('shapes_train') == 'shapes_train'   # bare word stays a string
    assert parse_value('/data/coco') == '/data/coco'
    assert parse_value('__import__("os")') == '__import__("os")'  # never evaluated


def test_update_args_sets_typed_values(fresh_cfg):
    cfg.update_args(['MODE_MASK=False', 'TRAIN.BASE_LR=1', 'DATA.TRAIN=shapes_train',
                     'PREPROC.TRAIN_SHORT_EDGE_SIZE=[256,320]', 'DATA.BASEDIR=~/data'])
    assert cfg.MODE_MASK is False
    assert cfg.TRAIN.BASE_LR == 1.0 and isinstance(cfg.TRAIN.BASE_LR, float)
    assert cfg.DATA.TRAIN == ('shapes_train',)          # a bare word for a tuple key
    assert cfg.PREPROC.TRAIN_SHORT_EDGE_SIZE == [256, 320]
    assert cfg.DATA.BASEDIR == '~/data'
    cfg.update_args(['BACKBONE.NORM=None'])
    assert cfg.BACKBONE.NORM == 'None'


@pytest.mark.parametrize('arg, words', [
    ('TRAIN.STEPS_PER_EPOCH=[1,2]', ['TRAIN.STEPS_PER_EPOCH', 'int', 'list']),
    ('MODE_FPN=1', ['MODE_FPN', 'bool']),
    ('TRAIN.BASE_LR=fast', ['TRAIN.BASE_LR', 'float', 'str']),
    ('BACKBONE.NORM=3', ['BACKBONE.NORM', 'str']),
    ('PREPROC.PIXEL_MEAN=1.0', ['PREPROC.PIXEL_MEAN', 'list']),
])
def test_wrong_types_are_clear_errors(fresh_cfg, arg, words):
    with pytest.raises(ConfigError) as e:
        cfg.update_args([arg])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_names_closest(fresh_cfg):
    with pytest.raises(ConfigError) as e:
        cfg.update_args(['TRAIN.BASE_LRR=0.1'])
    assert 'TRAIN.BASE_LRR' in str(e.value) and 'TRAIN.BASE_LR' in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg.update_args(['RESULTS_PER_IM=10'])
    assert 'TEST.RESULTS_PER_IM' in str(e.value)
    with pytest.raises(ConfigError):
        cfg.update_args(['NOEQUALSIGN'])


def test_sealed_and_frozen(fresh_cfg, toy_dataset):
    with pytest.raises(AttributeError, match='BASE_LR'):
        cfg.TRAIN.BASE_LRR          # reading an unknown key never creates it
    with pytest.raises(AttributeError):
        cfg.TRAIN.NEW_KEY = 1
    cfg.TRAIN.BASE_LR = 0.1         # known keys stay writable until finalisation
    cfg.update_args(['DATA.TRAIN=cfgtest_train', 'DATA.VAL=cfgtest_train'])
    _finalize(is_training=True, num_gpus=0)
    assert cfg.is_frozen()
    with pytest.raises(AttributeError):
        cfg.TRAIN.BASE_LR = 0.2
    with pytest.raises(AttributeError):
        cfg.TRAIN.NO_SUCH
    with pytest.raises(ConfigError, match='frozen'):
        cfg.update_args(['TRAIN.BASE_LR=0.3'])


def test_finalize_derives_classes_and_format(fresh_cfg, toy_dataset):
    cfg.update_args(['DATA.TRAIN=cfgtest_train', 'DATA.VAL=cfgtest_train'])
    _finalize(is_training=True, num_gpus=0)
    assert cfg.DATA.CLASS_NAMES == ['BG', 'cat', 'dog']
    assert cfg.DATA.NUM_CATEGORY == 2
    assert cfg.BACKBONE.DATA_FORMAT == 'NHWC'
    assert cfg.RPN.NUM_ANCHOR == 3      # FPN: ratios per level
    cfg.freeze(False)
    cfg.update_args(['MODE_FPN=False', 'BACKBONE.DATA_FORMAT='])  # '' = auto again
    _finalize(is_training=False, num_gpus=2)
    assert cfg.RPN.NUM_ANCHOR == 15 and cfg.BACKBONE.DATA_FORMAT == 'NCHW'


@pytest.mark.parametrize('args, message', [
    (['MODE_FPN=False', 'CASCADE.ENABLED=True'], 'CASCADE.ENABLED=True needs MODE_FPN'),
    (['PREPROC.IMAGE_CHANNELS=1'], 'PREPROC.PIXEL_MEAN has 3 values'),
    (['PREPROC.IMAGE_CHANNELS=4', 'PREPROC.PIXEL_MEAN=[1,2,3,4]'], 'PREPROC.PIXEL_STD has 3'),
    (['PREPROC.CROP_SIZE=500'], 'PREPROC.CROP_SIZE=500 must be a multiple'),
    (['PREPROC.TEST_SHORT_EDGE_SIZE=2000'], 'must not exceed PREPROC.MAX_SIZE'),
    (['BACKBONE.DEPTH=42'], 'BACKBONE.DEPTH must be one of 18, 34, 50, 101, got 42'),
    (['BACKBONE.NORM=BatchNorm'], 'BACKBONE.NORM must be one of'),
    (['TRAIN.IMAGES_PER_DEVICE=0'], 'TRAIN.IMAGES_PER_DEVICE must be an integer >= 1, got 0'),
    (['TRAINER=ddp'], 'TRAINER must be'),
    (['DATA.TRAIN=not_registered_anywhere'], 'DATA.TRAIN names dataset "not_registered_any'),
    (['DATA.VAL=cfgtest_trian'], 'Did you mean: cfgtest_train'),
    (['PREPROC.AUGMENTATIONS=["HorizontalFlip","VerticalFlop"]'], 'Did you mean: VerticalFlip'),
    (['PREPROC.AUGMENTATIONS=[["CopyPaste",{"drop_coverd":0.9}]]'],
     'Did you mean: drop_covered'),
    (['PREPROC.AUGMENTATIONS=[["VerticalFlip",{"prob":1.5}]]'], 'prob must be in [0, 1]'),
    (['PREPROC.AUGMENTATIONS=[["Rotate90",{"prob":"high"}]]'], 'must be a number >= 0'),
    (['PREPROC.AUGMENTATIONS=[["LargeScaleJitter",{"size":500}]]'], 'multiple of the largest'),
    (['PREPROC.AUGMENTATIONS=[["ColorJitter"]]'], 'each item is a name or [name,'),
    (['PRUNE.CHANNELS=[("conv0",32)]'], 'PRUNE.CHANNELS must be a mapping'),
    (['PRUNE.CHANNELS={"conv0":0}'], "'conv0': 0 must be a layer name and a positive int"),
    (['PRUNE.GN_GROUPS={"fpn/gn_c2":2.5}'], 'must be a layer name and a positive int'),
    (['PRUNE.CHANNELS={"conv0":24}', 'PRUNE.GN_GROUPS={"conv0/gn":16}'],
     'conv0/gn has 16 groups, which do not divide its 24 channels'),
    (['PRUNE.DROPPED_BLOCKS=["group0/block3"]'], "'group0/block3' is not a residual block of "
                                                 'ResNet-50'),
    (['PRUNE.DROPPED_BLOCKS=["res5/block0"]'], 'is not a residual block'),
    (['PRUNE.DROPPED_BLOCKS=[3]'], '3 is not a residual block'),
    (['BACKBONE.NORM=None', 'PRUNE.DROPPED_BLOCKS=["group3/block0"]'],
     'PRUNE.DROPPED_BLOCKS needs a BACKBONE.NORM'),
])
def test_finalize_validation_errors(fresh_cfg, toy_dataset, args, message):
    cfg.update_args(['DATA.TRAIN=cfgtest_train', 'DATA.VAL=cfgtest_train'] + args)
    with pytest.raises(ConfigError) as e:
        _finalize(is_training=True, num_gpus=0)
    assert message in str(e.value)
    assert not cfg.is_frozen()


def test_fp16_trains_only_on_gpu_and_predicts_fp32_on_cpu(fresh_cfg, toy_dataset):
    cfg.update_args(['DATA.TRAIN=cfgtest_train', 'DATA.VAL=cfgtest_train', 'TRAIN.PRECISION=fp16'])
    with pytest.raises(ConfigError, match='fp16 needs a GPU'):
        _finalize(is_training=True, num_gpus=0)
    _finalize(is_training=True, num_gpus=1)
    assert cfg.TRAIN.PRECISION == 'fp16'
    cfg.freeze(False)
    _finalize(is_training=False, num_gpus=0)  # an fp16-trained model on a CPU
    assert cfg.TRAIN.PRECISION == 'fp32'


def test_grayscale_and_rgbd_validate(fresh_cfg, toy_dataset):
    cfg.update_args(['DATA.TRAIN=cfgtest_train', 'DATA.VAL=cfgtest_train', 'PREPROC.IMAGE_CHANNELS=4',
                     'PREPROC.PIXEL_MEAN=[1.,2.,3.,4.]', 'PREPROC.PIXEL_STD=[1,1,1,1]'])
    _finalize(is_training=True, num_gpus=0)
    assert cfg.PREPROC.PIXEL_STD == [1, 1, 1, 1]


def test_yaml_round_trip(fresh_cfg, tmp_path):
    cfg.update_args(['TRAIN.BASE_LR=0.123', 'DATA.VAL=("a","b")', 'MODE_MASK=False'])
    path = str(tmp_path / 'c.yaml')
    cfg.save_yaml(path)
    saved = cfg.to_dict()
    cfg.update_args(['TRAIN.BASE_LR=0.5', 'DATA.VAL=c', 'MODE_MASK=True'])
    cfg.load_yaml(path)
    assert cfg.to_dict() == saved
    assert cfg.DATA.VAL == ('a', 'b') and cfg.TRAIN.BASE_LR == 0.123


def test_yaml_mapping_keys_round_trip_whole(fresh_cfg, tmp_path):
    """PRUNE.CHANNELS is one value (a mapping of layer names), not a sub-tree of keys."""
    widths = {'group0/block0/conv1': 48, 'fpn/posthoc_3x3_p2': 32}
    cfg.set_value('PRUNE.CHANNELS', widths)
    path = str(tmp_path / 'c.yaml')
    cfg.save_yaml(path)
    cfg.set_value('PRUNE.CHANNELS', {})
    cfg.load_yaml(path)
    assert cfg.PRUNE.CHANNELS == widths and 'PRUNE.CHANNELS' in cfg.mapping_keys()


def test_yaml_keeps_machine_derived_data_format_auto(fresh_cfg, toy_dataset, tmp_path):
    cfg.update_args(['DATA.TRAIN=cfgtest_train', 'DATA.VAL=cfgtest_train'])
    _finalize(is_training=True, num_gpus=1)      # a GPU run derives NCHW
    assert cfg.BACKBONE.DATA_FORMAT == 'NCHW'
    path = str(tmp_path / 'gpu.yaml')
    cfg.save_yaml(path)
    cfg.freeze(False)
    cfg.load_yaml(path)
    _finalize(is_training=False, num_gpus=0)     # predicting on a CPU
    assert cfg.BACKBONE.DATA_FORMAT == 'NHWC'


def test_yaml_unknown_key_is_error(fresh_cfg, tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('TRAIN:\n  BASE_LRR: 0.1\n')
    with pytest.raises(ConfigError, match='TRAIN.BASE_LRR'):
        cfg.load_yaml(str(path))
    with pytest.raises(ConfigError, match='does not exist'):
        cfg.load_yaml(str(tmp_path / 'missing.yaml'))
    broken = tmp_path / 'broken.yaml'
    broken.write_text('TRAIN: [1, 2\n')
    with pytest.raises(ConfigError, match='broken.yaml" is not valid YAML'):
        cfg.load_yaml(str(broken))


def test_cli_unknown_key_exits_nonzero_naming_key():
    """`train.py --config NO.SUCH_KEY=1` fails in one line naming the key."""
    p = subprocess.run([sys.executable, 'train.py', '--config', 'NO.SUCH_KEY=1'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert 'NO.SUCH_KEY' in p.stderr
    assert 'Traceback' not in p.stderr
    p = subprocess.run([sys.executable, 'train.py', '--config', 'TRAIN.BASE_LRR=1'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and 'TRAIN.BASE_LR' in p.stderr


def test_snapshot_restore_and_override_bring_everything_back(fresh_cfg):
    before = cfg.snapshot()
    with cfg.override(['TRAIN.BASE_LR=0.5', 'DATA.VAL=x']):
        assert cfg.TRAIN.BASE_LR == 0.5 and cfg.DATA.VAL == ('x',)
        cfg.RPN.ANCHOR_SIZES = (1, 2)
    assert cfg.snapshot() == before
    cfg.PREPROC.PIXEL_MEAN.append(1.)  # in place: the snapshot holds its own copy
    assert cfg.snapshot() != before
    cfg.freeze()
    cfg.restore(before)
    assert cfg.snapshot() == before and not cfg.is_frozen()
    with pytest.raises(ConfigError, match='Unknown config key'):
        with cfg.override({'NO.KEY': 1}):
            pass
    assert cfg.snapshot() == before


def test_retired_keys_of_old_runs_load_only_with_their_old_value(fresh_cfg, tmp_path):
    path = tmp_path / 'old.yaml'
    path.write_text('TRAIN:\n  STARTING_EPOCH: 1\nBACKBONE:\n  TF_PAD_MODE: false\n')
    cfg.load_yaml(str(path))
    assert 'STARTING_EPOCH' not in cfg.TRAIN.to_dict()
    with pytest.raises(ConfigError, match='BACKBONE.TF_PAD_MODE" was removed'):
        cfg.update_args(['BACKBONE.TF_PAD_MODE=True'])


@pytest.mark.parametrize('key, value, message', [
    ('FPN.FRCNN_HEAD_FUNC', 'fastrcnn_4conv1fc_gnhead', 'Did you mean: fastrcnn_4conv1fc_gn_head'),
    ('FPN.MRCNN_HEAD_FUNC', 'maskrcnn_up4conv', "'maskrcnn_up4conv_head'"),
    ('BACKBONE.TRAINABLE', '6+', "'all', '3+'"),
])
def test_choice_errors_name_the_allowed_values(fresh_cfg, toy_dataset, key, value, message):
    cfg.update_args(['DATA.TRAIN=cfgtest_train', 'DATA.VAL=cfgtest_train', key + '=' + value])
    with pytest.raises(ConfigError, match=key.replace('.', r'\.') + ' must be one of') as e:
        _finalize(True, 0)
    assert message in str(e.value)


def test_allowed_value_lists_match_the_code_acting_on_them():
    from modeling import backbone, model_frcnn, model_mrcnn
    from utils import precision
    assert set(model_frcnn.HEAD_FUNCS) == set(config_defaults.FRCNN_HEAD_FUNCS)
    assert set(model_mrcnn.HEAD_FUNCS) == set(config_defaults.MRCNN_HEAD_FUNCS)
    assert precision.PRECISIONS is config_defaults.PRECISIONS
    assert set(backbone.BLOCKS_FOR_DEPTH) == set(config_defaults.DEPTHS)
    assert set(backbone.FROZEN_STAGES_BY_TRAINABLE) == set(config_defaults.TRAINABLE_LAYERS)
