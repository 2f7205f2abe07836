"""The built-in presets: rows of the method table, not subclasses (mergekit's ``dare_ties``, ``dare_linear``)."""

from __future__ import annotations

from fedfuse.strategies.spec import Preset

BUILT_IN_PRESETS: tuple[Preset, ...] = (
    Preset(
        "dare_linear",
        base="task_arithmetic",
        default_sparsifier="dare",
        help="task arithmetic over DARE-dropped task vectors (PEFT/mergekit dare_linear)",
    ),
    Preset(
        "dare_ties",
        base="ties",
        default_sparsifier="dare",
        help="TIES over DARE-dropped task vectors (PEFT/mergekit dare_ties)",
    ),
    Preset(
        "breadcrumbs",
        base="task_arithmetic",
        default_sparsifier="breadcrumbs",
        help="task arithmetic over breadcrumbs (outliers and smallest dropped; mergekit breadcrumbs)",
    ),
    Preset(
        "breadcrumbs_ties",
        base="ties",
        default_sparsifier="breadcrumbs",
        help="TIES over breadcrumbs-dropped task vectors (mergekit breadcrumbs_ties)",
    ),
    Preset(
        "della",
        base="ties",
        default_sparsifier="della",
        help="TIES over DELLA MagPrune-dropped task vectors (mergekit della)",
    ),
    Preset(
        "della_linear",
        base="task_arithmetic",
        default_sparsifier="della",
        help="task arithmetic over DELLA MagPrune-dropped task vectors (mergekit della_linear)",
    ),
    Preset(
        "multi_krum",
        base="krum",
        fixed={"select": 0},
        help="multi-Krum: the average of the K − f best-scored updates",
    ),
)
