"""One config system for train, cbd_ens and tune.

A config is resolved in layers, each recorded in the resolved config's ``layers`` list:

1. the typed defaults of the core sections (``defaults``: :mod:`~rayexperts.config.schema`),
2. the data set's defaults (registered with the data set: backbone, transforms, schedule),
3. the method's defaults (registered with the method: K, classifier, sampler, ...) and the
   method's own section ``<method>.*`` (its ``Options`` dataclass),
4. ``--config PRESET_OR_YAML`` (``base: other`` first: :mod:`~rayexperts.config.presets`),
5. ``compat=official``: "this preset as the authors' released code ran it": the values the method
   declares (its ``official`` map) and each preset file's ``official:`` block (its base's first), every
   value with its source; the resolved config's ``sources`` map names the source of each value they set
   (:mod:`~rayexperts.config.official`),
6. ``key=value`` dotted overrides (:mod:`~rayexperts.config.composition`, with ``explain``).

Every key is typed (allowed values are ``Literal`` field types) and checked: an unknown key is
an error naming the key and the closest valid ones, a key that was renamed names its new name; values
a type cannot express are checked by :mod:`~rayexperts.config.validation`. The core knows no method by
name: a method's section, defaults and renames come from the method registry (:mod:`rayexperts.registry`).
The package imports nothing of Ray (what only a Ray job needs checked is :mod:`rayexperts.launch.ray_job`).

Modules, each importing only those before it: ``layers`` (a layer, dotted keys), ``schema`` (typed sections,
keys), ``serialise`` (dict, YAML, dotted keys), ``presets`` (files, ``base:`` chains), ``official``
(``compat=official`` layers and their sources), ``paths``, ``validation``, ``composition``.
"""

from __future__ import annotations

from rayexperts.config.composition import (compose, config_layers, default_layers, explain, from_dict, load_config,
                                           method_layers, model_layers, parse_overrides, with_overrides)
from rayexperts.config.layers import Layer, provenance
from rayexperts.config.official import OfficialValue, method_official, official_values
from rayexperts.config.paths import absolute_path_or_uri, absolute_paths, is_uri
from rayexperts.config.presets import PRESET_DIR, file_layers, list_presets, preset_path
from rayexperts.config.schema import (CORE_SECTIONS, NOT_RESULT_KEYS, Config, DataSection, EvalSection, ModelSection,
                                      RunSection, ScalingSection, TrainSection, TuneSection, is_result_key, valid_keys)
from rayexperts.config.serialise import flatten, result_settings, settings, to_dict, to_yaml
from rayexperts.config.validation import check_gpu_share, parse_test_distribution, validate
from rayexperts.errors import ConfigError

__all__ = [
    "CORE_SECTIONS", "Config", "ConfigError", "DataSection", "EvalSection", "Layer", "ModelSection", "NOT_RESULT_KEYS",
    "OfficialValue", "PRESET_DIR", "RunSection", "ScalingSection", "TrainSection", "TuneSection",
    "absolute_path_or_uri", "absolute_paths", "check_gpu_share", "compose", "config_layers", "default_layers",
    "explain", "file_layers", "flatten", "from_dict", "is_result_key", "is_uri", "list_presets", "load_config",
    "method_layers", "method_official", "model_layers", "official_values", "parse_overrides", "parse_test_distribution",
    "preset_path", "provenance", "result_settings", "settings", "to_dict", "to_yaml", "valid_keys", "validate",
    "with_overrides",
]
