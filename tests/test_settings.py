from __future__ import annotations

import pytest

from common.settings import SettingsError, load_settings


def test_defaults_are_the_single_machine_setup() -> None:
    settings = load_settings({})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert not settings.is_s3
    assert settings.model == "llava-hf/llava-interleave-qwen-7b-hf"


def test_values_come_from_prefixed_variables() -> None:
    settings = load_settings({"VIDEOQA_STORAGE_URL": "s3://bucket/prefix", "VIDEOQA_MAX_FRAMES": "12", "OTHER": "x"})
    assert settings.is_s3
    assert settings.max_frames == 12


def test_errors_name_the_variable_in_words_an_operator_understands() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"VIDEOQA_REDIS_URL": "http://localhost", "VIDEOQA_MAX_FRAMES": "zero"})
    message = str(caught.value)
    assert "VIDEOQA_REDIS_URL: Value error, must start with redis://" in message
    assert "VIDEOQA_MAX_FRAMES" in message


def test_time_limit_must_stay_below_the_visibility_timeout() -> None:
    with pytest.raises(SettingsError, match="VIDEOQA_TASK_TIME_LIMIT_S must be below VIDEOQA_VISIBILITY_TIMEOUT_S"):
        load_settings({"VIDEOQA_TASK_TIME_LIMIT_S": "4000", "VIDEOQA_VISIBILITY_TIMEOUT_S": "3600"})


def test_stored_objects_must_outlive_four_task_time_limits() -> None:
    with pytest.raises(
        SettingsError, match="VIDEOQA_STORAGE_RETENTION_S must be at least 4 x VIDEOQA_TASK_TIME_LIMIT_S"
    ):
        load_settings({"VIDEOQA_STORAGE_RETENTION_S": "3600", "VIDEOQA_TASK_TIME_LIMIT_S": "1800"})
    assert load_settings({"VIDEOQA_STORAGE_RETENTION_S": "7200", "VIDEOQA_TASK_TIME_LIMIT_S": "1800"})
    assert not load_settings({}).share_frames_across_tenants


def test_the_older_name_of_the_text_limit_still_applies() -> None:
    assert load_settings({"VIDEOQA_MAX_QUESTION_CHARS": "12"}).max_text_chars == 12
    assert load_settings({"VIDEOQA_MAX_TEXT_CHARS": "13"}).max_text_chars == 13


def test_the_older_name_of_the_transient_retries_still_applies() -> None:
    assert load_settings({"VIDEOQA_INGEST_MAX_RETRIES": "7"}).transient_retries == 7
    assert load_settings({"VIDEOQA_TRANSIENT_RETRIES": "8"}).transient_retries == 8
    assert load_settings({}).transient_retries == 5
