"""The config tree class: attribute access, typed dotted-key updates, YAML, snapshots.

``config_defaults.py`` declares the keys on one ``AttrDict``; ``config.py`` validates and
freezes it. Values are Python literals parsed with ``ast.literal_eval``; a bare word is a
string.
"""
import ast
import contextlib
import copy
import difflib
import os
import pprint

import yaml

__all__ = ['AttrDict', 'ConfigError', 'parse_value', 'read_yaml_leaves']


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key."""


class AttrDict:
    """A tree of attributes.

    While the defaults are declared, reading a missing attribute creates a sub-tree.
    ``seal()`` ends that: afterwards reading or writing an unknown attribute raises
    ``AttributeError`` naming the closest keys. ``freeze()`` (done by ``finalize_configs``)
    also refuses writes to known keys.
    """

    _sealed = False
    _frozen = False

    def __getattr__(self, name):
        if self._sealed or name.startswith('_'):
            raise AttributeError(self._unknown_message(name))
        ret = AttrDict()
        setattr(self, name, ret)
        return ret

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError('Config is frozen after finalize_configs(); cannot set '
                                 '"{}".'.format(name))
        if self._sealed and name not in self.__dict__:
            raise AttributeError(self._unknown_message(name))
        super().__setattr__(name, value)

    def _unknown_message(self, name):
        close = difflib.get_close_matches(name, list(self.__dict__), n=3, cutoff=0.5)
        hint = ' Did you mean: {}?'.format(', '.join(close)) if close else ''
        return 'Config has no key "{}".{}'.format(name, hint)

    def __str__(self):
        return pprint.pformat(self.to_dict(), width=100, compact=True)

    __repr__ = __str__

    def to_dict(self):
        """A nested plain dict (tuples become lists), e.g. for YAML."""
        def conv(v):
            if isinstance(v, AttrDict):
                return v.to_dict()
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            return v
        return {k: conv(v) for k, v in self.__dict__.items() if not k.startswith('_')}

    def flat_keys(self, prefix=''):
        """All leaf keys as dotted names, e.g. ``['DATA.BASEDIR', ...]``."""
        keys = []
        for k, v in self.__dict__.items():
            if k.startswith('_'):
                continue
            if isinstance(v, AttrDict):
                keys.extend(v.flat_keys(prefix + k + '.'))
            else:
                keys.append(prefix + k)
        return keys

    def _set_flag(self, flag, value):
        self.__dict__[flag] = value
        for v in self.__dict__.values():
            if isinstance(v, AttrDict):
                v._set_flag(flag, value)

    def seal(self, retired=None):
        """No new keys from now on. ``retired``: {dotted key: (old default, why)} of removed
        keys that old YAML files may still hold; setting one to its old default is a no-op."""
        self.__dict__['_retired'] = dict(retired or {})
        self._set_flag('_sealed', True)

    def freeze(self, frozen=True):
        """No writes at all (``frozen=False`` lifts it, e.g. between tests)."""
        self._set_flag('_frozen', frozen)

    def is_frozen(self):
        return self._frozen

    def snapshot(self):
        """Every leaf value (deep-copied), the frozen flag and the derived 'auto' keys:
        what ``restore`` needs to bring the tree back exactly."""
        values = {}
        for key in self.flat_keys():
            node, leaf = self._node_and_leaf(key)
            values[key] = copy.deepcopy(node.__dict__[leaf])
        return {'values': values, 'frozen': self._frozen,
                'auto': copy.deepcopy(self.__dict__.get('_auto_values', {}))}

    def restore(self, snapshot):
        """Put back what ``snapshot()`` returned (no type checks: the values were valid)."""
        self.freeze(False)
        for key, value in snapshot['values'].items():
            node, leaf = self._node_and_leaf(key)
            node.__dict__[leaf] = copy.deepcopy(value)
        self.__dict__['_auto_values'] = copy.deepcopy(snapshot['auto'])
        self.freeze(snapshot['frozen'])

    @contextlib.contextmanager
    def override(self, args=()):
        """Temporarily unfreeze and apply ``['KEY=VALUE', ...]`` (or a {key: value} dict);
        everything, the frozen flag included, is restored on exit."""
        saved = self.snapshot()
        try:
            self.freeze(False)
            if isinstance(args, dict):
                for key, value in args.items():
                    self.set_value(key, value)
            else:
                self.update_args(args)
            yield self
        finally:
            self.restore(saved)

    def _node_and_leaf(self, key):
        *parents, leaf = key.split('.')
        node = self
        for p in parents:
            node = node.__dict__[p]
        return node, leaf

    def _lookup(self, key):
        """Return (parent AttrDict, leaf name) of a dotted key, or raise ConfigError."""
        known = self.flat_keys()
        if key not in known:
            leaf = key.split('.')[-1]  # a right key in the wrong group, e.g. RESULTS_PER_IM
            close = [k for k in known if k.split('.')[-1] == leaf][:3]
            close = close or difflib.get_close_matches(key, known, n=3, cutoff=0.6) or \
                difflib.get_close_matches(key, known, n=3, cutoff=0.)
            hint = ' Closest known keys: {}.'.format(', '.join(close))
            raise ConfigError('Unknown config key "{}".{}'.format(key, hint))
        return self._node_and_leaf(key)

    def set_value(self, key, value):
        """Set a dotted key to a value, checking it against the default's type."""
        if self._frozen:
            raise ConfigError('Config is frozen; cannot set "{}".'.format(key))
        retired = self.__dict__.get('_retired', {})
        if key in retired:  # e.g. in the config.yaml of an older run
            kept, why = retired[key]
            if value != kept:
                raise ConfigError('Config key "{}" was removed ({}); only its old default {!r} '
                                  'is accepted, got {!r}.'.format(key, why, kept, value))
            return
        node, leaf = self._lookup(key)
        node.__dict__[leaf] = _check_type(key, node.__dict__[leaf], value)

    def update_args(self, args):
        """Apply ``['KEY=VALUE', ...]`` overrides from the command line."""
        for arg in args:
            if '=' not in arg:
                raise ConfigError('Config override "{}" is not of the form KEY=VALUE.'.format(arg))
            key, _, text = arg.partition('=')
            self.set_value(key.strip(), parse_value(text.strip()))

    def mapping_keys(self):
        """The dotted keys whose value is a mapping (a dict default, e.g. PRUNE.CHANNELS):
        YAML holds them as nested mappings, but each is one value."""
        def value(key):
            node, leaf = self._node_and_leaf(key)
            return node.__dict__[leaf]
        return [k for k in self.flat_keys() if isinstance(value(k), dict)]

    def load_yaml(self, path):
        """Apply every leaf of a YAML file (as written by ``save_yaml``)."""
        for key, value in read_yaml_leaves(path, self.mapping_keys()).items():
            self.set_value(key, value)

    def save_yaml(self, path):
        """Write every leaf; keys derived from this machine are written as 'auto'."""
        tree = self.to_dict()
        for key, value in self.__dict__.get('_auto_values', {}).items():
            *parents, leaf = key.split('.')
            node = tree
            for p in parents:
                node = node[p]
            node[leaf] = value
        with open(path, 'w') as f:
            yaml.safe_dump(tree, f, default_flow_style=None, sort_keys=False)


def read_yaml_leaves(path, mapping_keys=()):
    """A YAML config file -> {dotted key: value} of its leaves (ConfigError if unreadable);
    a key of ``mapping_keys`` is one leaf holding its whole mapping."""
    if not os.path.isfile(path):
        raise ConfigError('Config file "{}" does not exist.'.format(path))
    with open(path) as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError('Config file "{}" is not valid YAML: {}'.format(
                path, str(e).replace('\n', ' '))) from None
    if not isinstance(tree, dict):
        raise ConfigError('Config file "{}" must hold a mapping.'.format(path))
    leaves = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and prefix + str(k) not in mapping_keys:
                walk(v, prefix + str(k) + '.')
            else:
                leaves[prefix + str(k)] = v
    walk(tree, '')
    return leaves


def parse_value(text):
    """A Python literal if ``text`` parses as one, else the text itself (a bare word)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_type(key, default, value):
    """Coerce ``value`` to the type of ``default`` where that is lossless, else raise."""
    if default is None:
        return value
    if value is None and isinstance(default, str):
        return 'None'  # e.g. BACKBONE.NORM=None: the literal parses as Python's None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
        if isinstance(value, str):  # a bare word for a one-item list, e.g. DATA.VAL=balloon_val
            return type(default)([value])
    else:
        return value
    raise ConfigError('Config key "{}" expects a {} (like {!r}), got {} {!r}.'.format(
        key, type(default).__name__, default, type(value).__name__, value))
