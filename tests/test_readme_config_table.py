"""The run-config reference lives once, in the settings' fields: README and pyproject are checked against it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedfuse.settings import RunSettings
from fedfuse.settings.table import generated_block_of, readme_block, rewrite_readme, toml_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_run_config_table_is_the_generated_one() -> None:
    block = generated_block_of((ROOT / "README.md").read_text(encoding="utf-8"))
    assert block is not None, "README.md lost its generated run-config block"
    assert block == readme_block(), "run `python -m fedfuse.settings.table --readme README.md`"


def test_the_generated_table_has_one_row_per_key_with_its_default() -> None:
    block = readme_block()
    for key, value in RunSettings().to_run_config().items():
        rows = [line for line in block.splitlines() if line.startswith(f"| `{key}` |")]
        assert len(rows) == 1, key
        shown = rows[0].split(" | ")[1]
        assert shown == (
            f'`"{value}"`' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)
        ), key


def test_every_key_has_a_description() -> None:
    rows = [line for line in readme_block().splitlines() if line.startswith("| `") and "|---" not in line]
    assert all(row.rstrip(" |").split(" | ")[-1].strip() for row in rows)


def test_pyproject_app_config_holds_exactly_the_settings_keys_with_the_same_defaults() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunSettings().to_run_config()
    assert list(config) == list(defaults)
    assert {key: (type(value), value) for key, value in config.items()} == {
        key: (type(value), value) for key, value in defaults.items()
    }
    assert tomllib.loads(toml_table())["tool"]["flwr"]["app"]["config"] == defaults


def test_rewrite_readme_replaces_only_the_generated_block(tmp_path) -> None:
    readme = tmp_path / "README.md"
    stale = readme_block().replace("| `lam` | 1.0 |", "| `lam` | 2.0 |")
    readme.write_text(f"# title\n\n{stale}\n\nafter\n", encoding="utf-8")
    assert rewrite_readme(readme) is True
    assert readme.read_text(encoding="utf-8") == f"# title\n\n{readme_block()}\n\nafter\n"
    assert rewrite_readme(readme) is False
