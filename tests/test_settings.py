"""Every setting is defined once, in the model that uses it, and reaches that
model as a flag and as an environment variable."""

from __future__ import annotations

import pytest

from metarec.drift import DriftConfig
from metarec.joiner import JoinConfig
from metarec.meta import MetaConfig
from metarec.session import SessionConfig
from streamer.cli import build_parser, main, settings_of
from streamer.config import LEAVES, Settings
from streamer.errors import ConfigError


def test_every_setting_of_the_core_has_a_flag_on_run_and_replay() -> None:
    core = {leaf.name for leaf in LEAVES.values() if leaf.path[0] == "session"}
    assert len(core) >= 40  # learning, joining, ordering, caches, drift
    for command in ("run", "replay"):
        parser = build_parser()
        sub = next(a for a in parser._subparsers._group_actions  # type: ignore[union-attr]
                   ).choices[command]
        dests = {a.dest for a in sub._actions}
        assert core <= dests, core - dests


@pytest.mark.parametrize(("flag", "value", "where"), [
    ("--meta-min-task", "7", lambda s: s.session.learner.meta.min_task == 7),
    ("--no-meta-update-tables", None, lambda s: s.session.learner.meta.update_tables is False),
    ("--item-slots", "5", lambda s: s.session.learner.model.features.item_slots == 5),
    ("--drift-min-logloss-rise", "0.05", lambda s: s.session.drift.min_logloss_rise == 0.05),
    ("--drift-reference-blocks", "20", lambda s: s.session.drift.reference_blocks == 20),
    ("--max-orphan-clicks", "10", lambda s: s.session.join.max_orphan_clicks == 10),
    ("--idle-partition-seconds", "3", lambda s: s.session.order.idle_partition_seconds == 3),
    ("--token-cache-bytes", "0", lambda s: s.session.cache.token_cache_bytes == 0),
    ("--algorithm", "maml", lambda s: s.session.learner.meta.algorithm.value == "maml"),
    ("--from", "100", lambda s: s.replay.from_time == 100),
])
def test_a_flag_reaches_the_nested_setting(flag: str, value: str | None, where) -> None:  # type: ignore[no-untyped-def]
    argv = ["replay", "synthetic", flag] + ([value] if value is not None else [])
    assert where(settings_of(build_parser().parse_args(argv)))


def test_the_environment_sets_a_setting_by_its_flat_or_its_nested_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAREC_META_MIN_TASK", "9")
    monkeypatch.setenv("METAREC_SESSION__DRIFT__MIN_PSI", "0.4")
    monkeypatch.setenv("METAREC_INNER_STEPS", "2")
    s = settings_of(build_parser().parse_args(["replay", "synthetic", "--inner-steps", "3"]))
    assert s.session.learner.meta.min_task == 9
    assert s.session.drift.min_psi == 0.4
    assert s.session.learner.model.inner_steps == 3  # the flag wins over the environment


def test_defaults_and_descriptions_are_those_of_the_core_models() -> None:
    s = Settings()
    assert s.session == SessionConfig()
    for path, model in ((("session", "join"), JoinConfig), (("session", "drift"), DriftConfig),
                        (("session", "learner", "meta"), MetaConfig)):
        for name, field in model.model_fields.items():
            leaf = next(v for v in LEAVES.values() if v.path == (*path, name))
            assert leaf.field is field


def test_an_invalid_value_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="min_task"):
        Settings.of(meta_min_task=1)


def test_a_lowercase_variable_is_read_as_the_nested_form_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("metarec_inner_steps", "4")
    assert Settings().session.learner.model.inner_steps == 4


def test_an_invalid_setting_is_named_by_its_flag_and_variable(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "synthetic", "--meta-min-task", "1"]) == 2
    err = capsys.readouterr().err
    assert "--meta-min-task (METAREC_META_MIN_TASK): Input should be greater than or equal " \
        "to 2 (got 1)" in err
    assert "Traceback" not in err


def test_a_section_variable_that_is_not_json_is_one_line_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("METAREC_SESSION", "{not json")
    assert main(["replay", "synthetic"]) == 2
    assert capsys.readouterr().err.startswith("metarec: invalid settings in the environment")


def test_an_unknown_setting_name_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no setting is named 'inner_stepz'"):
        Settings.of(inner_stepz=3)
