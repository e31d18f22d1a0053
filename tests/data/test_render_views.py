"""`dora render-views` (data.render_views): renders beside a prepared set, per-shape failures, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import trimesh

from dora_shapegen.data.render_views import (
    FAILURES_FILE,
    RenderConfig,
    check_config,
    load_renders,
    main,
    render_dataset,
    view_cameras,
)


def _prepared(tmp_path, sources: dict[str, str]):
    """A prepared folder whose samples hold only what render-views reads: the meta with the source mesh."""
    samples = tmp_path / "prepared" / "samples"
    samples.mkdir(parents=True)
    for shape_id, source in sources.items():
        np.savez(
            samples / f"{shape_id}.npz", meta=np.array(json.dumps({"shape_id": shape_id, "source": source}))
        )
    return tmp_path / "prepared"


def test_renders_are_written_per_shape_and_a_bad_shape_is_logged_and_skipped(tmp_path):
    box = tmp_path / "box.obj"
    trimesh.creation.box(extents=(1.0, 0.4, 0.6)).export(box)
    (tmp_path / "broken.obj").write_text("this is not a mesh\n")
    prepared = _prepared(
        tmp_path,
        {"box": str(box), "gone": str(tmp_path / "gone.obj"), "broken": str(tmp_path / "broken.obj")},
    )
    config = RenderConfig(num_views=3, size=48)
    summary = render_dataset(prepared, config)
    assert (summary["done"], summary["failed"], summary["skipped"]) == (1, 2, 0)

    renders = load_renders(prepared / "renders" / "box.npz")
    assert renders["images"].shape == (3, 48, 48, 3) and renders["images"].dtype == np.uint8
    np.testing.assert_array_equal(renders["cameras"], view_cameras(config, "box"))
    covered = (renders["images"] != 255).any(axis=-1)  # (V, S, S)
    assert covered.mean(axis=(1, 2)).min() > 0.1  # every view shows the box
    assert not covered[:, 0].any() and not covered[:, :, 0].any()  # recentred with a white border
    assert renders["meta"]["border_ratio"] == config.border_ratio

    failures = {
        row["shape_id"]: row["reason"]
        for row in map(json.loads, (prepared / FAILURES_FILE).read_text().splitlines())
    }
    assert "gone.obj not found" in failures["gone"]
    assert failures["broken"].startswith("shape broken:")

    again = render_dataset(prepared, config)  # a rerun skips what is done and retries only the failures
    assert (again["done"], again["skipped"]) == (0, 1)


def test_views_depend_only_on_seed_and_shape():
    config = RenderConfig(num_views=5, elevation_range=[0.0, 30.0])
    cameras = view_cameras(config, "chair-003")
    np.testing.assert_array_equal(cameras, view_cameras(config, "chair-003"))
    assert not np.array_equal(cameras, view_cameras(config, "chair-004"))
    assert ((cameras[:, 0] >= 0) & (cameras[:, 0] <= 30)).all()
    assert ((cameras[:, 1] >= 0) & (cameras[:, 1] < 360)).all()


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"num_views": 0}, "num_views"), ({"size": 16}, "size"), ({"elevation_range": [50, 10]}, "elevation")],
)
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        check_config(RenderConfig(**changes))


def test_cli_on_an_empty_folder_says_what_to_do(tmp_path, capsys):
    (tmp_path / "samples").mkdir()
    assert main([str(tmp_path)]) == 2
    assert "run `dora prepare` first" in capsys.readouterr().err
