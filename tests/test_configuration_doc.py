"""docs/configuration.md lists every setting, exactly as ``common.settings_doc`` renders them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.settings import Settings
from common.settings_doc import CONFIGURATION_DOC, REGENERATE, render_table, replace_table

ROOT = Path(__file__).parent.parent


def test_the_committed_table_is_what_the_settings_render() -> None:
    committed = CONFIGURATION_DOC.read_text()
    assert committed == replace_table(committed, render_table()), (
        f"docs/configuration.md is out of date with common/settings.py: run `{REGENERATE}`"
    )


def test_every_setting_has_a_description_and_a_row() -> None:
    document = CONFIGURATION_DOC.read_text()
    undescribed = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undescribed == []
    missing = [name for name in Settings.model_fields if f"| `VIDEOQA_{name.upper()}`" not in document]
    assert missing == []


def test_an_alias_is_listed_beside_its_setting() -> None:
    row = next(line for line in render_table().splitlines() if "`VIDEOQA_MAX_TEXT_CHARS`" in line)
    assert "(also `VIDEOQA_MAX_QUESTION_CHARS`)" in row


def test_defaults_read_as_an_operator_writes_them() -> None:
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ") for line in render_table().splitlines()[2:]}
    assert rows["VIDEOQA_STORAGE_URL"][2] == "`~/.cache/videoqa/storage`"  # not this machine's home
    assert rows["VIDEOQA_JOB_TTL_S"][2] == "`604800` (7 days)"
    assert rows["VIDEOQA_MAX_UPLOAD_BYTES"][2] == "`2147483648` (2 GiB)"
    assert rows["VIDEOQA_WEBHOOK_SECRET"][1:3] == ["secret", "unset"]
    assert rows["VIDEOQA_DEVICE"][1] == "`auto` \\| `cuda` \\| `cpu`"


@pytest.mark.service  # runs a command
def test_check_names_the_command_that_regenerates(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(replace_table(CONFIGURATION_DOC.read_text(), "| variable |\n"))
    command = [sys.executable, "-m", "common.settings_doc", "--path", str(stale)]
    checked = subprocess.run([*command, "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1 and REGENERATE in checked.stderr
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=60)
    assert stale.read_text() == CONFIGURATION_DOC.read_text()


def test_a_document_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="marker"):
        replace_table("# no table here\n", render_table())
