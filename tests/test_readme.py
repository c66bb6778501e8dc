"""Every setting is documented."""

from __future__ import annotations

from pathlib import Path

from common.settings import Settings


def test_every_setting_is_in_the_readme() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [f"VIDEOQA_{name.upper()}" for name in Settings.model_fields if f"`VIDEOQA_{name.upper()}`" not in readme]
    assert missing == []
