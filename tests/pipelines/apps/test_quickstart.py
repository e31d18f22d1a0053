"""A shortened `dora quickstart` (tiny configs, a few steps per stage) runs end to end, then resumes as a no-op."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import trimesh
import yaml

from dora_shapegen.config import CONFIG_DIR, load_yaml
from dora_shapegen.pipelines.apps.quickstart import main
from tests.pipelines._logs import foreign_warnings

QUICKSTART_DIT = CONFIG_DIR / "quickstart" / "dit.yaml"


def _write(path: Path, values: dict) -> None:
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def _tiny_quickstart_configs(folder: Path) -> Path:
    """The real quickstart YAMLs with tiny sizes: the schema is the shipped one, only the numbers shrink."""
    shutil.copytree(CONFIG_DIR / "quickstart", folder)
    orchestration = yaml.safe_load((folder / "quickstart.yaml").read_text())
    orchestration["dataset"]["num_shapes"] = 14  # one per category
    orchestration["vae"]["max_minutes"] = 2.0
    orchestration["dit"]["max_minutes"] = 2.0
    orchestration["bench"] = {"limit": 2, "tokens": [16, 32], "resolution": 24}
    orchestration["generate"].update(steps=2, resolution=24, prompts=["a chair", "a gear with twelve teeth"])
    orchestration["refine"] = {"enabled": True}  # the opt-in decoder refinement runs end to end here too
    _write(folder / "quickstart.yaml", orchestration)

    prepare = yaml.safe_load((folder / "prepare.yaml").read_text())
    prepare.update(
        epsilon=1 / 32, n_uniform=256, n_salient=128, n_volume=512, n_near=256, n_sharp=128, workers=2
    )
    _write(folder / "prepare.yaml", prepare)

    vae = yaml.safe_load((CONFIG_DIR / "vae" / "tiny.yaml").read_text())
    vae["model"]["epsilon"] = 1 / 32
    _write(folder / "vae.yaml", vae)

    bench = yaml.safe_load((folder / "bench.yaml").read_text())
    bench["metrics"].update(surface_points=2000, volume_points=2000, sharp_points=500)
    bench["latent"].update(enabled=False)
    bench["report"]["contact_sheet_shapes"] = 2
    _write(folder / "bench.yaml", bench)

    cache = yaml.safe_load((folder / "cache.yaml").read_text())
    cache.update(num_tokens=32, batch_size=4)
    _write(folder / "cache.yaml", cache)

    bench_generation = yaml.safe_load((folder / "bench_generation.yaml").read_text())
    bench_generation.update(steps=2, resolution=16, points=64, emd_points=8)
    _write(folder / "bench_generation.yaml", bench_generation)

    dit = yaml.safe_load((CONFIG_DIR / "dit" / "tiny.yaml").read_text())
    dit["model"]["in_channels"] = vae["model"]["latent_channels"]
    # The guidance and scheduler shift the shipped quickstart's pipeline stores, which its generate and bench stages
    # then sample with.
    for key in ("guidance_scale", "scheduler_shift"):
        dit["sampling"][key] = load_yaml(QUICKSTART_DIT)["sampling"][key]
    _write(folder / "dit.yaml", dit)

    refine = yaml.safe_load((folder / "vae_refine.yaml").read_text())
    refine["training"].update(max_steps=3, warmup_steps=1, checkpoint_every=0)
    _write(folder / "vae_refine.yaml", refine)
    codes = yaml.safe_load((folder / "sample_codes.yaml").read_text())
    codes.update(variants=1, num_inference_steps=2)
    _write(folder / "sample_codes.yaml", codes)
    return folder


def test_shortened_quickstart_runs_every_stage_and_resumes(tmp_path, capfd):
    configs = _tiny_quickstart_configs(tmp_path / "configs")
    out = tmp_path / "qs"
    assert main(["--out", str(out), "--configs", str(configs)]) == 0
    # Each stage is a `dora` subprocess writing to the same terminal: nothing printed is a foreign warning.
    printed = capfd.readouterr()
    assert not foreign_warnings(printed.err + printed.out), foreign_warnings(printed.err + printed.out)

    # Every stage left its product and its done-marker.
    assert (out / "dataset" / "index.jsonl").exists()
    assert len(list((out / "prepared" / "samples").glob("*.npz"))) == 14
    assert (out / "vae" / "final" / "config.json").exists()
    assert (out / "bench" / "results.json").exists()
    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    assert manifest["num_samples"] == 14
    assert (out / "dit" / "final" / "config.json").exists()
    # The pipeline stores dit.yaml's guidance; the generate and bench-generation stages sampled at it and say so.
    assert json.loads((out / "pipeline" / "model_index.json").read_text())["default_guidance_scale"] == 1.5
    assert json.loads((out / ".stages" / "generate.json").read_text())["guidance"] == 1.5
    samples = json.loads((out / "samples" / "samples.json").read_text())
    assert [row["prompt"] for row in samples] == ["a chair", "a gear with twelve teeth"]
    for row in samples:
        if row["path"]:  # an untrained tiny model may decode to nothing; what is written must be a mesh
            assert len(trimesh.load(out / "samples" / row["path"], force="mesh").faces) == row["faces"]
    assert (out / "samples" / "grid.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## Stages" in report and "## Samples" in report and "## Generation" in report
    generation = json.loads((out / "bench_generation" / "results.json").read_text())
    assert set(generation["sets"]) == {"captions", "paraphrases"}
    assert generation["settings"]["guidance"] == 1.5 and "guidance 1.5, scheduler shift 3," in report
    # dit.yaml's sampling.scheduler_shift reached the pipeline (exported with the DiT) and the benchmark sampled with it.
    assert json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    assert generation["scheduler"]["shift"] == 3.0
    per_prompt = yaml.safe_load((configs / "bench_generation.yaml").read_text())["samples_per_prompt"]
    assert (
        generation["sets"]["captions"]["overall"]["num_samples"] == 14 * per_prompt
    )  # one caption per category
    stages = sorted(p.stem for p in (out / ".stages").glob("*.json"))
    assert stages == sorted([*BASE_STAGES, *REFINE_STAGES])
    # With the refinement on, the pipeline carries the decoder refined on the DiT's codes.
    codes = json.loads((out / "codes" / "codes.json").read_text())
    assert codes["num_shapes"] >= 1 and codes["num_codes"] == 2 * codes["num_shapes"]
    refined = out / "vae_refined" / "final"
    assert yaml.safe_load((refined / "run_config.yaml").read_text())["training"]["trainable"] == "decoder"
    from safetensors.torch import load_file

    shipped = load_file(str(out / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(refined / "diffusion_pytorch_model.safetensors"))
    assert shipped.keys() == tuned.keys() and all(torch.equal(shipped[k], tuned[k]) for k in tuned)
    assert "## Decoder refined on the DiT's own codes" in report

    # A second run finds every stage done and redoes nothing.
    capfd.readouterr()
    before = (out / "vae" / "final" / "config.json").stat().st_mtime_ns
    assert main(["--out", str(out), "--configs", str(configs)]) == 0
    log = capfd.readouterr().out
    assert log.count("already done") == 12
    assert (out / "vae" / "final" / "config.json").stat().st_mtime_ns == before


def test_the_shipped_quickstart_samples_at_its_dits_guidance():
    """One place sets the quickstart's guidance: dit.yaml's sampling.guidance_scale, which assemble-pipeline
    stores; the generate and bench-generation stages leave it to the pipeline."""
    from dora_shapegen.pipelines.apps.quickstart import load_quickstart_config

    configs = CONFIG_DIR / "quickstart"
    assert load_yaml(QUICKSTART_DIT)["sampling"]["guidance_scale"] == 1.5
    assert load_quickstart_config(configs).generate.guidance is None
    assert "guidance" not in load_yaml(configs / "bench_generation.yaml")


def test_missing_config_is_a_clear_error(tmp_path, capsys):
    configs = _tiny_quickstart_configs(tmp_path / "configs")
    (configs / "quickstart.yaml").unlink()
    assert main(["--out", str(tmp_path / "qs"), "--configs", str(configs)]) == 1
    assert "quickstart.yaml" in capsys.readouterr().err


def _calibrate(
    monkeypatch: pytest.MonkeyPatch,
    configs: Path,
    vae_seconds: float,
    dit_seconds: float,
    calibrated_share: int,
    rate_now: float,
) -> dict[str, int]:
    """Calibrate the ETA on a machine doing 2 block passes per second that spent 300 s outside the trainings and the
    given seconds on 1/``calibrated_share`` of the step budgets in ``configs``; this machine's rate is ``rate_now``.
    Returns the budgets (VAE and DiT ``max_steps``)."""
    import dora_shapegen.pipelines.apps.quickstart as quickstart

    steps = {name: load_yaml(configs / f"{name}.yaml")["training"]["max_steps"] for name in ("vae", "dit")}
    steps["vae_refine"] = load_yaml(configs / "vae_refine.yaml")["training"]["max_steps"]
    # The decoder refinement: 60 s of sampling codes (no step count) and 60 s of fine-tuning.
    calibration = quickstart.Calibration(
        2.0, 300.0, vae_seconds, steps["vae"] // calibrated_share, dit_seconds,
        steps["dit"] // calibrated_share, codes_seconds=60.0,
        codes_variants=load_yaml(configs / "sample_codes.yaml")["variants"], refine_seconds=60.0,
        refine_steps=steps["vae_refine"] // calibrated_share,
    )  # fmt: skip
    monkeypatch.setattr(quickstart, "CALIBRATION", calibration)
    monkeypatch.setattr(quickstart, "measure_training_rate", lambda: rate_now)
    return steps


def test_quickstart_prints_step_budgets_and_an_eta_scaled_by_this_machine(tmp_path, monkeypatch):
    import dora_shapegen.pipelines.apps.quickstart as quickstart

    configs = CONFIG_DIR / "quickstart"
    # Calibrated at half the shipped budgets: the ETA doubles the training seconds (300 + 2 x 210 + 2 x 240), and
    # a machine half as fast right now doubles it again.
    steps = _calibrate(monkeypatch, configs, 210.0, 240.0, calibrated_share=2, rate_now=1.0)
    message = quickstart.Quickstart(tmp_path / "out", configs).eta_message()
    assert f"VAE {steps['vae']} steps, DiT {steps['dit']} steps" in message and "refinement" not in message
    assert "~20 min on the calibration's free 2-core machine" in message and "ETA ~40 min" in message

    # With the decoder refinement on: + 60 s of sampling codes (by their count, not steps) + 2 x 60 s of fine-tuning.
    refined = quickstart.Quickstart(tmp_path / "out", _with_refine(tmp_path / "refined", {"enabled": True}))
    message = refined.eta_message()
    assert f"decoder refinement {steps['vae_refine']} steps" in message
    assert "~23 min on the calibration's free 2-core machine" in message and "ETA ~46 min" in message

    # Without a calibration only the budgets are printed (no guessed time).
    monkeypatch.setattr(quickstart, "CALIBRATION", quickstart.Calibration(training_rate=0.0))
    message = quickstart.Quickstart(tmp_path / "out", configs).eta_message()
    assert "ETA" not in message and f"VAE {steps['vae']} steps" in message


def test_the_training_rate_is_measured_on_transformer_blocks_in_about_a_second():
    import time

    from dora_shapegen.pipelines.apps.quickstart import measure_training_rate

    started = time.perf_counter()
    rate = measure_training_rate(repeats=2)
    # Passes per second of real forward and backward work: positive and finite, and the measurement itself short
    # (three passes; a 2-core machine does several per second).
    assert 0.0 < rate < float("inf")
    assert time.perf_counter() - started < 3.0 / rate + 10.0


def test_a_config_folder_with_the_former_calibration_keys_still_loads(tmp_path, capsys):
    from dora_shapegen.pipelines.apps.quickstart import load_quickstart_config

    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR / "quickstart", configs)
    orchestration = yaml.safe_load((configs / "quickstart.yaml").read_text())
    orchestration["calibration"] = {"matmul_gflops": 203.0, "other_stages_seconds": 203.0}
    orchestration["vae"]["calibrated_seconds"] = 507.0
    _write(configs / "quickstart.yaml", orchestration)
    assert load_quickstart_config(configs) == load_quickstart_config(CONFIG_DIR / "quickstart")
    assert "'calibration' is ignored" in capsys.readouterr().err


def test_report_flags_a_training_cut_by_the_wall_clock_cap(tmp_path):
    from dora_shapegen.pipelines.apps.quickstart_report import write_report

    (tmp_path / "vae").mkdir()
    (tmp_path / "dit").mkdir()
    (tmp_path / "vae" / "summary.json").write_text(
        json.dumps({"steps": 700, "stopped_by_time": False, "final": {}})
    )
    (tmp_path / "dit" / "summary.json").write_text(json.dumps({"steps": 31, "stopped_by_time": True}))
    report = write_report(tmp_path, {"train-vae": 1.0, "train-dit": 1.0}).read_text()
    vae_part, dit_part = report.split("## DiT")
    assert "wall-clock cap" not in vae_part
    assert "wall-clock cap stopped this training after 31 steps" in dit_part


def test_budget_multiplies_every_step_count_and_the_eta(tmp_path, monkeypatch):
    import dora_shapegen.pipelines.apps.quickstart as quickstart

    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR / "quickstart", configs)
    _calibrate(monkeypatch, configs, 420.0, 480.0, calibrated_share=1, rate_now=2.0)
    run = quickstart.Quickstart(tmp_path / "out", configs, budget=2)
    # 300 s + 2 x (420 + 480) s = 35 min: only the trainings scale.
    assert "~35 min on the calibration's free 2-core machine" in run.eta_message()

    original = load_yaml(configs / "dit.yaml")  # dit.yaml lists what differs from its base
    scaled = yaml.safe_load(run.training_config("dit").read_text())
    assert scaled["training"]["max_steps"] == 2 * original["training"]["max_steps"]
    assert scaled["training"]["warmup_steps"] == 2 * original["training"]["warmup_steps"]
    assert scaled["schedule"]["mixture"]["ramp_steps"] == 2 * original["schedule"]["mixture"]["ramp_steps"]
    # The EMA averages the same share of the longer run; everything that is not a step count is unchanged.
    assert 1 - scaled["training"]["ema_decay"] == pytest.approx((1 - original["training"]["ema_decay"]) / 2)
    assert (
        scaled["model"] == original["model"]
        and scaled["training"]["learning_rate"] == original["training"]["learning_rate"]
    )
    # At 1x the shipped YAML itself is used, and a nonsense budget is refused.
    assert quickstart.Quickstart(tmp_path / "out", configs).training_config("dit") == configs / "dit.yaml"
    with pytest.raises(ValueError, match="positive"):
        quickstart.scale_stage_config(original, 0.0)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--budget", "-1"])


BASE_STAGES = [
    "build-dataset",
    "prepare",
    "train-vae",
    "bench",
    "cache-latents",
    "train-dit",
    "assemble-pipeline",
    "generate",
    "bench-generation",
]
REFINE_STAGES = ["sample-codes", "refine-decoder", "assemble-refined"]


def _planned(configs: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, list[tuple]]:
    """The quickstart of ``configs`` and the (index, total, name, action) of every stage its run() goes through,
    none of them run (no report, no ETA measurement)."""
    import dora_shapegen.pipelines.apps.quickstart as quickstart
    import dora_shapegen.pipelines.apps.quickstart_report as quickstart_report

    run = quickstart.Quickstart(out, configs)
    planned: list[tuple] = []
    monkeypatch.setattr(run, "_run_stage", lambda *stage: planned.append(stage))
    monkeypatch.setattr(run, "eta_message", lambda: "")
    monkeypatch.setattr(quickstart_report, "write_report", lambda folder, times: folder / "report.md")
    run.run()
    return run, planned


def _with_refine(folder: Path, refine: dict | None = None) -> Path:
    """The shipped quickstart configs with quickstart.yaml's ``refine`` section set to ``refine`` (None: no such
    section, as in a config folder written before the refinement stages)."""
    shutil.copytree(CONFIG_DIR / "quickstart", folder)
    orchestration = yaml.safe_load((folder / "quickstart.yaml").read_text())
    orchestration.pop("refine", None)
    if refine is not None:
        orchestration["refine"] = refine
    _write(folder / "quickstart.yaml", orchestration)
    return folder


def test_the_decoder_refinement_stages_run_only_when_enabled(tmp_path, monkeypatch):
    from dora_shapegen.pipelines.apps.quickstart import load_quickstart_config

    for name, refine in (("absent", None), ("disabled", {"enabled": False})):
        configs = _with_refine(tmp_path / name, refine)
        assert load_quickstart_config(configs).refine.enabled is False
        _, planned = _planned(configs, tmp_path / f"out_{name}", monkeypatch)
        assert [stage[2] for stage in planned] == BASE_STAGES, name
        assert [(stage[0], stage[1]) for stage in planned] == [(i, 9) for i in range(1, 10)]

    configs = _with_refine(tmp_path / "enabled", {"enabled": True, "max_minutes": 3.0})
    _, planned = _planned(configs, tmp_path / "out_enabled", monkeypatch)
    names = [stage[2] for stage in planned]
    at = names.index("assemble-pipeline") + 1
    assert (
        names == BASE_STAGES[:at] + REFINE_STAGES + BASE_STAGES[at:]
    )  # before generate: it samples the refined
    assert [(stage[0], stage[1]) for stage in planned] == [(i, 12) for i in range(1, 13)]


def test_the_refinement_stages_run_sample_codes_a_decoder_fine_tune_and_assemble_it(tmp_path, monkeypatch):
    configs = _with_refine(tmp_path / "configs", {"enabled": True, "max_minutes": 3.0})
    out = tmp_path / "out"
    run, planned = _planned(configs, out, monkeypatch)
    commands: list[list[str]] = []
    monkeypatch.setattr(run, "_dora", lambda *args: commands.append(list(args)))
    actions = {stage[2]: stage[3] for stage in planned}
    (out / "codes").mkdir(parents=True)
    (out / "codes" / "codes.json").write_text(
        json.dumps(
            {"num_codes": 8, "num_shapes": 2, "distance_by_sigma": {"0.500": {}}, "shape_ids": ["a", "b"]}
        )
    )
    (out / "vae_refined" / "final").mkdir(parents=True)
    (out / "vae_refined" / "final" / "metrics.json").write_text(json.dumps({"iou@32": 0.5}))

    assert actions["sample-codes"]() == {"num_codes": 8, "num_shapes": 2, "distance_by_sigma": {"0.500": {}}}
    assert actions["refine-decoder"]() == {"iou@32": 0.5}
    actions["assemble-refined"]()
    sample, refine, assemble = commands
    assert sample == ["sample-codes", "--pipeline", str(out / "pipeline"), "--shards", str(out / "latents"),
                      "--out", str(out / "codes"), "--config", str(configs / "sample_codes.yaml")]  # fmt: skip
    assert refine == ["train-vae", "--config", str(configs / "vae_refine.yaml"), "--output-dir",
                      str(out / "vae_refined"), "--max-minutes", "3.0", "--data", str(out / "prepared"),
                      "--init-from", str(out / "vae" / "final"), "--codes", str(out / "codes")]  # fmt: skip
    assert assemble[:3] == ["assemble-pipeline", "--vae", str(out / "vae_refined" / "final")]
    assert assemble[assemble.index("--out") + 1] == str(out / "pipeline")  # generate samples the refined VAE


def test_the_shipped_refinement_configs_load():
    from dora_shapegen.config import load_config
    from dora_shapegen.pipelines.sample_codes import SampleCodesConfig, check_config
    from dora_shapegen.vae.train import VAETrainConfig

    configs = CONFIG_DIR / "quickstart"
    refine = load_config(VAETrainConfig, configs / "vae_refine.yaml")
    vae = load_config(VAETrainConfig, configs / "vae.yaml")
    assert refine.training.trainable == "decoder" and 0.0 <= refine.data.clean_code_fraction <= 1.0
    assert refine.model == vae.model  # the VAE the fine-tune starts from (--init-from OUT/vae/final)
    codes = load_config(SampleCodesConfig, configs / "sample_codes.yaml")
    check_config(codes)
    # sample-codes leaves out the VAE's held-out shapes: the same split as the VAE's validation.
    assert codes.held_out_fraction == vae.data.val_fraction
