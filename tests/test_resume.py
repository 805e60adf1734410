"""Exact resume: a training process killed with SIGKILL at a step the test draws from a seed, resumed with
``ckpt_path=last`` in its own run folder, leaves a ``metrics.csv`` with the same per-step losses as an uninterrupted
run's, bit for bit, every step once (the killed run's rows up to its checkpoint kept), for every stage (autoencoder
with its GAN phase, diffusion with EMA and caption dropout, inpainting with its random masks, CLIP, prior), and with
two loader workers."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from k3lab.run.resume import AtomicCheckpointIO, resolve_ckpt_path
from k3lab.train import train

from conftest import SMALL_WORLD, T2I_PIXEL_16, compose_config

COMMON = [
    *SMALL_WORLD,
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=1",
]
# the process the test kills checkpoints every step, keeping the newest step file (and last.ckpt): disk stays small
EVERY_STEP = ["callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.model_checkpoint.save_top_k=1"]
SMALL_16 = ["data.resolution=16", "data.batch_size=16", "data.val_batch_size=16"]
STAGES: dict[str, list[str]] = {
    # GAN phase from batch 6: two optimizer steps per batch after it
    "autoencoder": [
        "experiment=autoencoder_tiny",
        "data.batch_size=8",
        "stage.disc_start=6",
        "trainer.max_steps=20",
        "trainer.val_check_interval=5",
    ],  # fmt: skip
    "diffusion": [
        *T2I_PIXEL_16,
        "trainer.max_steps=14",
        "trainer.val_check_interval=4",
        "stage.validation.prompts=[]",
        "stage.conditioning.dropout=0.3",
    ],  # fmt: skip
    # the 9-channel layout in pixel space (x_t, keep mask, masked image: 3 + 1 + 3), a fresh mask per sample
    "inpainting": [
        *[o for o in T2I_PIXEL_16 if not o.startswith(("experiment=", "model.unet.in_channels="))],
        "experiment=inpainting_tiny",
        "model.unet.in_channels=7",
        "stage.init_weights=null",
        "trainer.max_steps=14",
        "trainer.val_check_interval=4",
        "stage.validation.prompts=[]",
    ],  # fmt: skip
    "clip": [
        "experiment=clip_tiny",
        *SMALL_16,
        "model.clip.patch_size=4",
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
    ],  # fmt: skip
    "prior": [
        "experiment=prior_tiny",
        *SMALL_16,
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
        "stage.stats_batches=2",
        "stage.sample_steps=2",
    ],  # fmt: skip
}


def losses(run_dir: Path) -> dict[int, dict[str, str]]:
    """step -> the losses logged at that step (every ``train/*`` column, and ``val/*``: validation uses the EMA
    weights where a stage keeps them), from the run's CSV log."""
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    out: dict[int, dict[str, str]] = {}
    for r in rows:
        values = {k: v for k, v in r.items() if k.startswith(("train/", "val/")) and v not in ("", None)}
        if values:
            out.setdefault(int(r["step"]), {}).update(values)
    return out


def cli(overrides: list[str], run_dir: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "k3lab.train", *overrides, f"paths.root_dir={root}", f"hydra.run.dir={run_dir}"]


def newest_step(checkpoint_dir: Path) -> int:
    """The step of the newest ``step<N>.ckpt`` in the folder (-1 when there is none yet)."""
    steps = [int(p.stem[4:]) for p in checkpoint_dir.glob("step*.ckpt") if p.stem[4:].isdigit()]
    return max(steps, default=-1)


def kill_at(cmd: list[str], checkpoint_dir: Path, step: int, timeout: float = 240) -> None:
    """Start ``cmd``; SIGKILL it as soon as it has checkpointed step ``step`` (it has gone on a little by then)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    while newest_step(checkpoint_dir) < step:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError(f"no step-{step} checkpoint after {timeout} s")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    root = tmp_path_factory.mktemp("clip_for_prior")
    cfg = compose_config(
        [
            "experiment=clip_tiny",
            f"paths.data_dir={data_root}",
            *COMMON,
            *SMALL_16,
            "model.clip.patch_size=4",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
        ],  # fmt: skip
        root,
    )
    train(cfg)
    return Path(cfg.paths.checkpoint_dir) / "clip.safetensors"


@pytest.mark.parametrize(
    ("stage", "workers"),
    [("autoencoder", 0), ("diffusion", 0), ("diffusion", 2), ("inpainting", 0), ("clip", 0), ("prior", 0)],
)
def test_a_killed_run_resumes_exactly(
    stage: str, workers: int, tmp_path: Path, data_root: Path, request: pytest.FixtureRequest
) -> None:
    overrides = [*STAGES[stage], f"paths.data_dir={data_root}", f"paths.weights_dir={data_root / 'weights'}", *COMMON]
    overrides.append(f"data.num_workers={workers}")
    if workers > 1:  # 32 batches a pass (256 scenes / 8): 40 steps cross a pass end, with the kill on either side
        overrides = [o if not o.startswith("trainer.max_steps=") else "trainer.max_steps=40" for o in overrides]
    if stage == "prior":
        overrides.append(f"mapping.clip.checkpoint={request.getfixturevalue('clip_checkpoint')}")
    max_steps = int(next(o for o in overrides if o.startswith("trainer.max_steps=")).split("=")[1])
    kill_step = random.Random(f"{stage}-{workers}").randint(3, max_steps - 6)
    full = compose_config(overrides, tmp_path / "full")
    train(full)
    expected = losses(Path(full.paths.output_dir))
    assert max(expected) == max_steps - 1 or stage == "autoencoder"  # (GAN steps advance the step by 2)

    run_dir = tmp_path / "killed"
    cmd = cli([*overrides, *EVERY_STEP], run_dir, tmp_path / "root")
    kill_at(cmd, run_dir / "checkpoints", kill_step)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed_from = int(last["global_step"])
    assert resumed_from >= kill_step - 2  # last.ckpt is written after the step file (and a GAN batch is 2 steps)
    done = subprocess.run([*cmd, "ckpt_path=last"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in done.stderr + done.stdout
    got = losses(run_dir)  # the killed run's rows up to its checkpoint, then the resumed run's: every step once
    assert sorted(got) == sorted(expected), (resumed_from, sorted(set(got) ^ set(expected)))
    mismatched = {s: (got[s], expected.get(s)) for s in got if got[s] != expected.get(s)}
    assert not mismatched, f"resumed from step {resumed_from}; differing steps: {mismatched}"
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss") or r.get("train/rec_loss")]
    assert len(train_steps) == len(set(train_steps)), "a step logged twice"


def test_the_data_position_and_random_state_are_what_makes_it_exact(tmp_path: Path, data_root: Path) -> None:
    """Negative controls: the same resume without the loader's state, or without the random state, diverges."""
    overrides = [*STAGES["diffusion"], f"paths.data_dir={data_root}", f"paths.weights_dir={data_root / 'weights'}",
                 *COMMON]  # fmt: skip
    full = compose_config(
        [*overrides, "callbacks.model_checkpoint.every_n_train_steps=6", "callbacks.model_checkpoint.save_top_k=-1"],
        tmp_path / "full",
    )
    train(full)
    expected = losses(Path(full.paths.output_dir))
    ckpt = torch.load(Path(full.paths.checkpoint_dir) / "step0000006.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 6}]
    for name, strip in (
        ("no_data", lambda c: c["loops"]["fit_loop"]["state_dict"].pop("combined_loader")),
        ("no_random", lambda c: c["callbacks"].pop("ResumeState")),
    ):
        broken = {**ckpt, "loops": {**ckpt["loops"]}, "callbacks": dict(ckpt["callbacks"])}
        broken["loops"]["fit_loop"] = {**ckpt["loops"]["fit_loop"]}
        broken["loops"]["fit_loop"]["state_dict"] = dict(ckpt["loops"]["fit_loop"]["state_dict"])
        strip(broken)
        path = tmp_path / f"{name}.ckpt"
        torch.save(broken, path)
        cfg = compose_config([*overrides, f"ckpt_path={path}"], tmp_path / name)
        train(cfg)
        got = losses(Path(cfg.paths.output_dir))
        assert any(got[s] != expected[s] for s in got), name


def test_checkpoint_writes_are_atomic_and_last_resumes_or_starts_fresh(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    class Boom(dict):
        def __reduce_ex__(self, protocol: object) -> object:
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"step": torch.tensor(2), "bad": Boom()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # and no temporary file is left
    (tmp_path / "last.ckpt.tmp-123").write_bytes(b"half")
    assert resolve_ckpt_path("last", tmp_path) == str(path) and not (tmp_path / "last.ckpt.tmp-123").exists()
    assert resolve_ckpt_path("last", tmp_path / "empty") is None  # a requeued job before its first checkpoint
    assert resolve_ckpt_path(None, tmp_path) is None and resolve_ckpt_path("x.ckpt", tmp_path) == "x.ckpt"


def test_seeded_builders_leave_the_global_random_stream_alone(tmp_path: Path) -> None:
    """Building the tiny T5 (first run only: later runs load it) or the small CLIP must not reset the training's random
    stream: a run's numbers would otherwise depend on a cache, and every seed of a mapping-prior cell would draw the
    same noise."""
    from k3lab.data.scene_captions import caption_vocabulary
    from k3lab.nn.clip import small_clip
    from k3lab.nn.tiny_t5 import build_tiny_t5

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_t5(tmp_path / "t5", caption_vocabulary())
    small_clip()
    assert torch.equal(torch.rand(4), expected)


def test_a_preemption_signal_checkpoints_requeues_and_continues_the_mlflow_run(tmp_path: Path, data_root: Path) -> None:
    """submitit's local executor (the SLURM code path, hydra/launcher=slurm_local); the test sends the preemption
    signal to the running job: it saves last.ckpt, submitit requeues it, the requeued job resumes from the checkpoint
    into the same run folder and the same MLflow run; the sweep has one child."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = tmp_path / "sweep"
    overrides = [*STAGES["diffusion"], f"paths.data_dir={data_root}", f"paths.weights_dir={data_root / 'weights'}",
                 *COMMON, *EVERY_STEP, "trainer.max_steps=30", "logger=mlflow", f"paths.mlflow_uri={uri}",
                 "seed=3"]  # fmt: skip
    cmd = [sys.executable, "-m", "k3lab.train", "-m", "hydra/launcher=slurm_local", *overrides,
           f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    env = {**os.environ, "SUBMITIT_PREEMPT_SIGNAL": "USR2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    start = time.monotonic()
    while newest_step(sweep / "0" / "checkpoints") < 8:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() - start < 240, "the job never reached step 8"
        time.sleep(0.05)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("text2image_tiny")
    running = client.search_runs([experiment.experiment_id], "tags.`k3lab.role` = 'job'")
    assert len(running) == 1
    os.kill(int(running[0].data.tags["k3lab.pid"]), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    logs = "\n".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "SIGUSR2 received: saved" in logs and "resuming from" in logs and "continuing MLflow run" in logs
    runs = client.search_runs([experiment.experiment_id], "tags.`k3lab.role` = 'job'")
    assert len(runs) == 1 and runs[0].info.run_id == running[0].info.run_id  # one child, the same run
    assert runs[0].info.status == "FINISHED"
    parent = running[0].data.tags["mlflow.parentRunId"]
    assert client.get_run(parent).info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")})
    assert steps == list(range(30))  # the whole curve, in one run
