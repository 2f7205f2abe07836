"""Run settings shared by the ClientApp, the ServerApp, ``fedfuse simulate`` and ``fedfuse bench``.

``RunSettings.from_run_config(run_config)`` reads Flower's flat run config (``local-steps = 20``) on
top of the defaults, checks every value and names the key that is wrong. In code a setting lives in
its section: ``settings.source`` (model and data), ``settings.training`` (local training),
``settings.compression`` (what clients send), ``settings.merge`` (the server's merge) and
``settings.run`` (rounds, sampling, outputs).
"""

from fedfuse.settings.attack import ATTACKS, AttackSettings
from fedfuse.settings.compression import WIRE_DTYPES, CompressionSettings
from fedfuse.settings.fields import Scalar, SettingsError
from fedfuse.settings.merge import DEVICES, LORA_AGGREGATIONS, WEIGHTINGS, MergeSettings, build_merge_strategy
from fedfuse.settings.privacy import DP_MODES, DP_STRATEGIES, PrivacySettings
from fedfuse.settings.run import TRACKERS, RunControl
from fedfuse.settings.run_settings import SECTIONS, RunSettings
from fedfuse.settings.source import AUTO_MAX_LENGTH, PARTITIONS, TASKS, SourceSettings
from fedfuse.settings.training import (
    AUTO_LEARNING_RATE,
    AUTO_TARGET_MODULES,
    CLIENT_DEVICES,
    MODES,
    PRECISIONS,
    QUANTIZATIONS,
    TrainingSettings,
)

__all__ = [
    "ATTACKS",
    "AUTO_LEARNING_RATE",
    "AUTO_MAX_LENGTH",
    "AUTO_TARGET_MODULES",
    "CLIENT_DEVICES",
    "DEVICES",
    "DP_MODES",
    "DP_STRATEGIES",
    "LORA_AGGREGATIONS",
    "MODES",
    "PARTITIONS",
    "PRECISIONS",
    "QUANTIZATIONS",
    "SECTIONS",
    "TASKS",
    "TRACKERS",
    "WEIGHTINGS",
    "WIRE_DTYPES",
    "AttackSettings",
    "CompressionSettings",
    "MergeSettings",
    "PrivacySettings",
    "RunControl",
    "RunSettings",
    "Scalar",
    "SettingsError",
    "SourceSettings",
    "TrainingSettings",
    "build_merge_strategy",
]
