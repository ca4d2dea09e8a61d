"""A tuned ablation point on disk: written and read back exactly, tampering refused."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_dir.abliteration import AblationOptions, AblationPoint, Kernel
from refusal_dir.directions import DirectionMeta, DirectionSet
from refusal_dir.errors import ConfigError
from refusal_dir.tuned import ABLATION_FILE, MEANS_FILE, TunedAblation, read_tuned, write_tuned


def _directions() -> DirectionSet:
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 3, 8, generator=generator)
    meta = DirectionMeta(
        model_id="tiny", model_revision=None, d_model=8, n_layers=3, site="resid_pre", position="last",
        positions=("last",), method="mean_diff", prompt_set_hash="0" * 16, package_version="0",
    )
    return DirectionSet.from_raw(raw, meta)


POINT = AblationPoint(Kernel(0.9, 1.0, 0.3, 1.5), Kernel(1.2, 0.5, 0.0, 2.0), direction_index=1.25)


def test_round_trip_is_exact(tmp_path) -> None:
    means = torch.randn(3, 8)
    written = TunedAblation("some/model", POINT, AblationOptions(True, False, "last"), _directions(), means)
    write_tuned(tmp_path, written)
    read = read_tuned(tmp_path)
    assert (read.model, read.point, read.options) == (written.model, written.point, written.options)
    assert torch.equal(read.directions.directions, written.directions.directions)
    assert read.harmless_means is not None and torch.equal(read.harmless_means, means)


def test_unprojected_point_needs_no_means(tmp_path) -> None:
    write_tuned(tmp_path, TunedAblation("m", POINT, AblationOptions(False, True, None), _directions()))
    assert not (tmp_path / MEANS_FILE).exists()
    assert read_tuned(tmp_path).harmless_means is None


def test_projected_point_without_means_is_refused() -> None:
    with pytest.raises(ConfigError, match="harmless means"):
        TunedAblation("m", POINT, AblationOptions(projected=True), _directions())


@pytest.mark.parametrize("tamper", ["means", "point", "missing"])
def test_changed_or_missing_files_are_refused_in_one_line(tmp_path, tamper) -> None:
    write_tuned(tmp_path, TunedAblation("m", POINT, AblationOptions(True, True, None), _directions(), torch.ones(3, 8)))
    if tamper == "means":
        (tmp_path / MEANS_FILE).write_bytes((tmp_path / MEANS_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    elif tamper == "point":
        raw = json.loads((tmp_path / ABLATION_FILE).read_text())
        raw["point"]["attn"]["max_weight"] = 5.0
        (tmp_path / ABLATION_FILE).write_text(json.dumps(raw))
    else:
        (tmp_path / MEANS_FILE).unlink()
    with pytest.raises(ConfigError) as error:
        read_tuned(tmp_path)
    assert "\n" not in str(error.value) and "tune --objective remove" in str(error.value)


def test_not_a_tune_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no tuned ablation point"):
        read_tuned(tmp_path)
