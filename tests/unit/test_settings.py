"""Settings declared once (issue #16): the config fields carry their help and flags, the CLI
builds its flags from them, ``default.yaml`` is generated from them; renamed keys still load
with a warning (docs/glossary.md)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from refusal_dir.cli import _config, add_setting_flags, build_parser, main
from refusal_dir.config import (
    RENAMED_KEYS,
    Config,
    config_from_dict,
    default_config_path,
    default_yaml_paths,
    defaults_yaml,
    load_config,
    setting,
    upgrade_stored_config,
)
from refusal_dir.errors import ConfigError


def all_fields() -> dict[str, dataclasses.Field]:
    return {
        f"{section.name}.{item.name}": item
        for section in dataclasses.fields(Config)
        for item in dataclasses.fields(getattr(Config(), section.name))
    }


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ----------------------------------------------------------------------------------------------
# default.yaml
# ----------------------------------------------------------------------------------------------


def test_default_yaml_is_generated_from_the_fields() -> None:
    paths = {*default_yaml_paths(), default_config_path().resolve()}
    for path in paths:
        assert path.read_text(encoding="utf-8") == defaults_yaml(), (
            f"{path} is out of date: run `python -m refusal_dir.config --write-defaults`"
        )


def yaml_comments(text: str) -> dict[str, str]:
    """``section.key`` -> its comment (continuation lines joined), read from the YAML text."""
    comments: dict[str, str] = {}
    section = key = ""
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.rstrip(":")
        elif line.lstrip().startswith("#"):
            comments[key] += " " + line.strip().lstrip("#")
        else:
            name, _, comment = line.partition("  # ")
            key = f"{section}.{name.strip().partition(':')[0]}"
            comments[key] = comment
    return {k: " ".join(v.split()) for k, v in comments.items()}


def test_default_yaml_keys_values_and_comments_are_the_fields() -> None:
    text = default_config_path().read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    fields = all_fields()
    keys = {f"{section}.{name}" for section, values in raw.items() for name in values}
    assert keys == set(fields)
    defaults = Config().to_dict()
    for key in keys:
        section, _, name = key.partition(".")
        assert raw[section][name] == defaults[section][name], key
    assert load_config() == Config()
    comments = yaml_comments(text)
    assert set(comments) == set(fields)
    for key, item in fields.items():
        assert comments[key] == " ".join(item.metadata["help"].split()), key


def test_every_field_is_declared_with_help() -> None:
    for key, item in all_fields().items():
        assert isinstance(item.metadata.get("help"), str) and item.metadata["help"].strip(), key


# ----------------------------------------------------------------------------------------------
# CLI flags derived from the fields
# ----------------------------------------------------------------------------------------------


def test_cli_flags_are_the_fields_that_declare_one_with_their_help() -> None:
    fields = all_fields()
    declared = {item.metadata["flag"]: key for key, item in fields.items() if item.metadata["flag"]}
    derived: dict[str, str] = {}
    for name, parser in subparsers().items():
        mapping = parser.get_default("setting_flags") or {}
        for action in parser._actions:
            if action.dest in mapping:
                key = mapping[action.dest]
                assert action.option_strings == [fields[key].metadata["flag"]], (name, key)
                assert action.default is None, (name, key)  # the config's value unless given
                assert action.help.replace("%%", "%") == fields[key].metadata["help"], (name, key)
                derived[action.option_strings[0]] = key
    assert derived == declared


def test_each_command_keeps_its_setting_flags() -> None:
    data = {"--pairs-file", "--harmful-file", "--benign-file", "--mmlu-file", "--harmless-answers-file", "--max-eval-prompts"}
    model = {"--model", "--device", "--dtype", "--device-map", "--max-memory", "--offload-folder", "--quantization"}
    sweep = {"--alphas", "--methods", "--layer", "--max-new-tokens", "--batch-size", "--no-honesty", "--no-cross-entropy"}
    expected = {
        "extract": model | data | {"--token", "--directions-methods", "--extract-batch-size", "--no-honesty", "--selection", "--selection-prompts", "--activation-store"},
        "steer": model | {"--apply-to"},
        "evaluate": model | data | sweep | {"--judge"},
        "run": model | data | sweep | {"--judge", "--selection-prompts", "--activation-store"},
        "tune": model | data | sweep,
        "export": model,
        "rejudge": {"--judge"},
    }
    for name, parser in subparsers().items():
        mapping = parser.get_default("setting_flags") or {}
        flags = {o for a in parser._actions if a.dest in mapping for o in a.option_strings}
        assert flags == expected[name], name


def test_a_field_with_a_flag_makes_a_flag() -> None:
    @dataclass(frozen=True)
    class Extra:
        speed: int = setting(3, "how fast, in 100% units", flag="--speed", type=int)
        colour: str = setting("red", "no flag")
        loud: bool = setting(True, "be loud", flag="--quietly", const=False)

    @dataclass(frozen=True)
    class Root:
        extra: Extra = field(default_factory=Extra)

    parser = argparse.ArgumentParser()
    add_setting_flags(parser, ["extra"], root=Root)
    assert {o for a in parser._actions for o in a.option_strings} == {"-h", "--help", "--speed", "--quietly"}
    assert "how fast, in 100% units" in parser.format_help()
    args = parser.parse_args(["--speed", "5", "--quietly"])
    assert args.setting_flags == {"speed": "extra.speed", "quietly": "extra.loud"}
    assert (args.speed, args.quietly) == (5, False)
    assert vars(parser.parse_args([]))["speed"] is None
    with pytest.raises(ValueError, match="declares no flag"):
        add_setting_flags(argparse.ArgumentParser(), ["extra.colour"], root=Root)


def test_a_config_file_value_is_overridden_only_by_a_flag_given(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"generation": {"max_new_tokens": 7}, "evaluation": {"honesty": False}, "data": {"max_eval_prompts": 3}}))
    base = ["run", "--config", str(path), "--output-dir", str(tmp_path / "o")]
    config = _config(build_parser().parse_args(base))
    assert (config.generation.max_new_tokens, config.evaluation.honesty, config.data.max_eval_prompts) == (7, False, 3)
    assert config.steering.alphas == Config().steering.alphas
    config = _config(build_parser().parse_args([*base, "--max-new-tokens", "9", "--alphas", "0", "1", "--no-cross-entropy"]))
    assert (config.generation.max_new_tokens, config.steering.alphas, config.evaluation.cross_entropy) == (9, (0.0, 1.0), False)


def test_directions_methods_keep_a_steered_method_among_them(tmp_path: Path) -> None:
    args = build_parser().parse_args(["extract", "--output-dir", str(tmp_path), "--directions-methods", "pca", "probe"])
    config = _config(args)
    assert config.extraction.methods == ("pca", "probe") and config.extraction.method == "pca"


# ----------------------------------------------------------------------------------------------
# Renamed keys and flags (docs/glossary.md)
# ----------------------------------------------------------------------------------------------


def test_old_config_keys_load_with_a_warning_naming_the_new_key(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="extraction.position is deprecated: rename it to extraction.token"):
        config = config_from_dict({"extraction": {"position": "mean"}})
    assert config.extraction.token == "mean"
    path = tmp_path / "old.yaml"
    path.write_text("steering:\n  positions: prompt\n")
    with pytest.warns(DeprecationWarning, match="steering.apply_to"):
        assert load_config(path).steering.apply_to == "prompt"
    with pytest.warns(DeprecationWarning, match="steering.apply_to"):
        assert Config().with_overrides({"steering.positions": "generated"}).steering.apply_to == "generated"
    with pytest.warns(DeprecationWarning, match="extraction.token"):
        assert Config().extraction.position == "last"
    with pytest.warns(DeprecationWarning, match="steering.apply_to"):
        assert Config().steering.positions == "all"


@pytest.mark.parametrize(
    "raw",
    [{"extraction": {"position": "mean", "token": "last"}}, {"steering": {"positions": "all", "apply_to": "prompt"}}],
)
def test_old_and_new_key_together_is_one_line(raw) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw)
    message = str(error.value)
    assert "\n" not in message and "both" in message and "only" in message


def test_old_flags_are_hidden_aliases_that_warn(tmp_path: Path) -> None:
    args = build_parser().parse_args(["steer", "--directions-dir", "d", "--positions", "prompt"])
    with pytest.warns(DeprecationWarning, match="--positions is deprecated: use --apply-to"):
        assert _config(args).steering.apply_to == "prompt"
    args = build_parser().parse_args(["extract", "--output-dir", str(tmp_path), "--position", "mean"])
    with pytest.warns(DeprecationWarning, match="--token"):
        assert _config(args).extraction.token == "mean"
    args = build_parser().parse_args(["steer", "--directions-dir", "d", "--positions", "prompt", "--apply-to", "all"])
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="give --apply-to only"):
        _config(args)
    helps = {name: parser.format_help() for name, parser in subparsers().items()}
    assert "--positions" not in helps["steer"] and "--position " not in helps["extract"]
    assert _config(build_parser().parse_args(["steer", "--directions-dir", "d"])).steering.apply_to == "all"


def test_the_cli_logs_an_old_key_as_one_warning_line(capsys, caplog, tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("extraction:\n  position: mean\nsteering:\n  alphas: []\n")  # then an error
    with caplog.at_level(logging.WARNING):
        code = main(["extract", "--config", str(path), "--output-dir", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "steering.alphas" in capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warned == ["config key extraction.position is deprecated: rename it to extraction.token (docs/glossary.md)"]


# ----------------------------------------------------------------------------------------------
# Stored configs written before a rename
# ----------------------------------------------------------------------------------------------


def old_names(settings: dict) -> dict:
    """``settings`` as refusal_dir wrote them before the renames."""
    settings = json.loads(json.dumps(settings))
    settings["extraction"]["position"] = settings["extraction"].pop("token")
    settings["steering"]["positions"] = settings["steering"].pop("apply_to")
    return settings


def test_a_stored_config_under_the_old_names_reads_as_the_new_one() -> None:
    config = Config().with_overrides({"extraction.token": "mean", "steering.apply_to": "prompt"})
    stored = yaml.safe_load(yaml.safe_dump(old_names(config.to_dict())))
    assert upgrade_stored_config(stored) == config.to_dict()
    assert upgrade_stored_config("- a list") == "- a list"
    assert set(RENAMED_KEYS) == {"extraction.position", "steering.positions"}


def test_resume_keys_hash_the_settings_as_before_the_rename() -> None:
    from refusal_dir.pipeline import SPEED_ONLY_SETTINGS, results_config_digest

    config = Config().with_overrides({"extraction.token": "post_instruction", "steering.apply_to": "generated"})
    before = old_names(config.to_dict())  # the previous version hashed to_dict() under these names
    assert config.key_dict() == before
    for key in SPEED_ONLY_SETTINGS:
        section, _, name = key.partition(".")
        before[section].pop(name)
    assert results_config_digest(config) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
