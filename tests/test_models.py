"""Model folders are published atomically: a failure leaves neither a half-written folder nor a temp."""

import pytest

from kdbench.models import layer_subset, publishing_dir


def test_publishing_dir_replaces_the_target_only_on_success(tmp_path):
    out = tmp_path / "model"
    with publishing_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"

    with pytest.raises(RuntimeError):
        with publishing_dir(out) as tmp:
            (tmp / "config.json").write_text('{"half": true}')
            raise RuntimeError("killed midway")
    assert (out / "config.json").read_text() == "{}"  # the old, complete folder survives
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind


def test_student_keeps_every_other_block_and_the_last():
    assert layer_subset(30, 2) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29]
    assert layer_subset(5, 2) == [0, 2, 4]
