"""One ablation cell (one Hydra multirun job): shared parts -> diffusion stage -> evaluation, in one MLflow run.

The preset's ``ablation`` node names the shared parts as override lists for ``python -m k3lab.train`` (see
``conf/experiment/ablation_tiny.yaml``); the cell fills their exports into its own config
(``stage.first_stage.checkpoint``, ``mapping.clip.checkpoint``, ``mapping.prior.checkpoint``), trains, samples
the evaluation prompts and logs metrics, sample grids and ``metrics.json`` into the same run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import cast

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from k3lab.ablation.compute import StepFlops
from k3lab.ablation.curve import LearningCurve
from k3lab.ablation.evaluate import evaluate, needs_reference_clip
from k3lab.ablation.shared import precompute_part, reference_clip, train_part
from k3lab.io.options import plain_dict
from k3lab.run.fitting import close_loggers, fit, hydra_choices, where_to_look
from k3lab.stages.diffusion import DiffusionStage
from k3lab.tracking import find_mlflow_logger, log_image
from k3lab.tracking.sweep import PARENT_TAG, run_tags

log = logging.getLogger(__name__)


CELL_DONE = "cell_done.json"  # written after the cell's run is closed FINISHED
EVAL_SEED_STRIDE = 1_000_003  # evaluation sample i of a cell with seed s starts from noise seed base + s x stride + i


def evaluation_seed(base: int, seed: int) -> int:
    """The first sampling seed of a cell's evaluation: the same for every cell of one training seed (their samples
    pair up prompt by prompt: common random numbers), different across training seeds (independent replicates)."""
    return int(base) + EVAL_SEED_STRIDE * int(seed)


def finished_cell(out_dir: Path) -> dict | None:
    """``{"run_id", "metrics"}`` of a cell that already finished in this job folder (a resumed sweep), else None."""
    path = out_dir / CELL_DONE
    return json.loads(path.read_text()) if path.is_file() else None


def uses_prior(cfg: DictConfig) -> bool:
    """Whether the cell's config routes conditioning through the mapping prior."""
    return OmegaConf.select(cfg, "mapping.clip") is not None


def inherited_overrides(overrides: list[str], groups: tuple[str, ...] = ("data", "paths")) -> list[str]:
    """The cell's command-line overrides its shared parts must share (the dataset, the paths)."""
    out = []
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if key.split(".")[0].split("/")[0] in groups:
            out.append(item)
    return out


def prepare_shared(cfg: DictConfig, text_encoder: str, cell_overrides: list[str]) -> dict[str, str]:
    """Train (once) or find the shared parts this cell needs; returns the config keys to point at them.

    Every part gets the cell's data/paths overrides, ``ablation.extra_overrides`` and the cell's task name (its
    MLflow run sits under the sweep's parent)."""
    ab = cfg.ablation
    mapping = uses_prior(cfg)
    # ablation.precompute_image_embeddings: every cell's precomputed shards hold the CLIP image embeddings, so the
    # two arms of one text encoder share one precompute (the text arm reads only its text and latents)
    shared_embeddings = bool(ab.get("precompute") and ab.get("precompute_image_embeddings"))
    if shared_embeddings and not ab.get("clip"):
        raise ValueError(
            "ablation.precompute_image_embeddings=true embeds the images with the mapping arm's CLIP, but "
            "ablation.clip is empty: give the CLIP's training overrides there or set "
            "ablation.precompute_image_embeddings=false"
        )
    parent = run_tags().get(PARENT_TAG)
    root = str(ab.shared_dir)
    data_choice = hydra_choices().get("data")  # the cell's world (e.g. scene_world_ablation), then its data overrides
    inherited = [
        *([f"data={data_choice}"] if data_choice else []),
        *inherited_overrides(cell_overrides),
        f"task_name={cfg.task_name}",
    ]
    common = [*inherited, *(ab.get("extra_overrides") or [])]
    threads = ab.get("part_threads")
    # no autoencoder (ablation.autoencoder: null): the cells diffuse in pixel space
    autoencoder = (
        str(train_part("autoencoder", [*ab.autoencoder, *common], root, "autoencoder.safetensors", parent, threads))
        if ab.get("autoencoder")
        else None
    )
    updates: dict = {"stage.first_stage.checkpoint": autoencoder}
    # the mapping arm needs the CLIP; with shared embeddings every cell's precompute does (see above)
    needs_clip = mapping or shared_embeddings
    clip = train_part("clip", [*ab.clip, *common], root, "clip.safetensors", parent, threads) if needs_clip else None
    if mapping:
        prior_overrides = [*ab.prior, *common, f"model/text_encoder={text_encoder}", f"mapping.clip.checkpoint={clip}"]
        updates["mapping.clip.checkpoint"] = str(clip)
        updates["mapping.prior.checkpoint"] = str(
            train_part(f"prior_{text_encoder}", prior_overrides, root, "prior.safetensors", parent, threads)
        )
    # the frozen encoders' outputs, once per text encoder: training steps then skip both encoders
    if ab.get("precompute"):
        pc_overrides = [
            *inherited,
            f"model/text_encoder={text_encoder}",
            "stage=diffusion",
            f"stage.first_stage.checkpoint={autoencoder if autoencoder else 'null'}",
        ]
        name, features = f"precomputed_{text_encoder}", ["text.npy", "latent.npy"]
        if needs_clip:  # the CLIP's image embeddings too: the mapping arm's cells then skip the CLIP as well
            pc_overrides += [
                "model/prior=diffusion_mapping",
                f"mapping.clip.checkpoint={clip}",
                "precompute.image_embeddings=true",
            ]
            name = f"{name}_clip"
            if mapping:
                features = [*features, "clip_image.npy"]
        folder = precompute_part(name, pc_overrides, root, threads)
        updates |= {
            "data.resolution": int(cfg.data.resolution),
            "data.source": {"_target_": "k3lab.data.precompute.PrecomputedShards", "root": str(folder)},
            "data.format.feature_keys": features,
            # latents (and CLIP image embeddings) precomputed: no image decoding in training
            "data.format.decode_images": not autoencoder,
        }
    return updates


def learning_curve(cfg: DictConfig, splits: dict[str, list[str]], settings: dict) -> list[LearningCurve]:
    """The cell's learning-curve callback when ``ablation.curve.every_n_steps`` > 0 (else none)."""
    curve = OmegaConf.select(cfg, "ablation.curve")
    if curve is None or int(curve.get("every_n_steps") or 0) <= 0:
        return []
    from evaluation.prompts import load_scene_world

    prompts = [p for p in load_scene_world(splits["test"]).prompts if (p.spec or {}).get("kind") == "single"]
    prompts = prompts[: int(curve.num_prompts)]
    return [
        LearningCurve(
            prompts,
            int(curve.every_n_steps),
            int(cfg.data.resolution),
            settings,
            Path(cfg.paths.output_dir) / "curve.csv",
        )
    ]


def job_threads(setting: int | str | None) -> int | None:
    """``ablation.threads``: an int, or ``auto`` = this machine's cores / the launcher's parallel jobs (joblib's
    ``n_jobs``; 1 for the sequential launcher and for a single run without ``-m``, which has every core to itself);
    None leaves torch's default."""
    if setting is None:
        return None
    if setting != "auto":
        if int(setting) < 1:
            raise ValueError(f"ablation.threads={setting}: a positive number of threads, auto or null")
        return int(setting)
    n_jobs = 1
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        n_jobs = int(OmegaConf.select(cast(DictConfig, HydraConfig.get()), "launcher.n_jobs", default=1) or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, n_jobs))


def run_cell(cfg: DictConfig) -> dict[str, float]:
    """Shared parts (trained once), the diffusion stage, the evaluation: one MLflow child run; returns every metric."""
    if not cfg.get("ablation"):
        raise ValueError(
            "python -m k3lab.ablation runs ablation presets (configs with an `ablation` node), e.g. "
            "experiment=ablation_tiny"
        )
    done = finished_cell(Path(cfg.paths.output_dir))
    if done is not None:
        log.info(
            "cell %s already finished (MLflow run %s): not retrained (a resumed sweep)",
            cfg.paths.output_dir,
            done["run_id"],
        )
        return done["metrics"]
    threads = job_threads(OmegaConf.select(cfg, "ablation.threads"))
    if threads is not None:
        torch.set_num_threads(threads)
    text_encoder = hydra_choices().get("model/text_encoder")
    if not text_encoder:
        raise ValueError(
            "an ablation cell needs the model/text_encoder choice (run it through python -m k3lab.ablation)"
        )
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    splits = instantiate(cfg.data.source).build()  # the evaluation's prompts and real images: the dataset's own splits
    updates = prepare_shared(cfg, text_encoder, overrides)
    settings = plain_dict(cfg.ablation.evaluation, "ablation.evaluation")
    settings["sampling"] = plain_dict(cfg.sampling, "sampling")
    settings["seed"] = evaluation_seed(int(settings.get("seed", 0)), int(cfg.seed))
    ref_dir = (
        reference_clip(str(cfg.ablation.shared_dir), splits["train"], splits["val"], settings["reference_clip"])
        if needs_reference_clip(settings)
        else None
    )
    with open_dict(cfg):
        for key, value in updates.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        if not cfg.get("ckpt_path") and (Path(cfg.paths.checkpoint_dir) / "last.ckpt").is_file():
            cfg.ckpt_path = "last"  # a killed cell of a resumed sweep: continue its training and its MLflow run
    start = time.perf_counter()
    flops = StepFlops()
    result = fit(cfg, role="cell", keep_open=True, callbacks=[flops, *learning_curve(cfg, splits, settings)])
    fit_seconds = time.perf_counter() - start
    out_dir = Path(cfg.paths.output_dir)
    try:
        stage = result.stage.eval()
        if not isinstance(stage, DiffusionStage):
            raise TypeError(f"an ablation cell trains a diffusion stage, not {type(stage).__name__}")
        start = time.perf_counter()
        with torch.no_grad():
            metrics, grids = evaluate(
                stage.generator(), splits, int(cfg.data.resolution), settings, ref_dir, out_dir / "eval"
            )
        step = int(stage.global_step)
        metrics |= {
            "perf/fit_seconds": fit_seconds,
            "perf/eval_seconds": time.perf_counter() - start,
            "perf/train_samples_per_s": step * int(cfg.data.batch_size) / fit_seconds,
            "perf/threads": float(torch.get_num_threads()),
        }
        if flops.flops_per_step is not None:  # (restored from the checkpoint in a resumed cell)
            metrics |= {
                "perf/flops_per_step": float(flops.flops_per_step),
                "perf/train_flops": float(flops.flops_per_step) * step,
            }
        for lg in result.loggers:
            lg.log_metrics(metrics, step=step)
            lg.log_hyperparams(
                {f"shared/{k.split('.')[-2]}": v for k, v in updates.items() if k.endswith(".checkpoint")}
                | {
                    "shared/reference_clip": str(ref_dir or ""),
                    "shared/precomputed": str(OmegaConf.select(cfg, "data.source.root") or ""),
                }
            )
        for name, image in grids.items():
            log_image(result.loggers, image, f"eval/grid_{name}", step, out_dir / "eval")
        (out_dir / "metrics.json").write_text(json.dumps({**result.metrics, **metrics}, indent=1, sort_keys=True))
        mlf = find_mlflow_logger(result.loggers)
        if mlf is not None:
            mlf.experiment.log_artifact(mlf.run_id, str(out_dir / "metrics.json"))
    except BaseException:
        close_loggers(result.loggers, "FAILED")
        raise
    close_loggers(result.loggers, "FINISHED")
    mlf = find_mlflow_logger(result.loggers)
    (out_dir / CELL_DONE).write_text(
        json.dumps({"run_id": mlf.run_id if mlf is not None else None, "metrics": {**result.metrics, **metrics}})
    )
    seen = {k.split("/")[-1]: round(v, 3) for k, v in metrics.items() if k.startswith("eval/seen/")}
    name = ",".join(o for o in overrides if not o.startswith("experiment=")) or "defaults"
    log.info(
        "cell %s: seen %s; fid_clip %s, clip_score %s",
        name,
        seen,
        round(metrics.get("eval/fid_clip", float("nan")), 2),
        round(metrics.get("eval/clip_score", float("nan")), 2),
    )
    where_to_look(cfg, result.loggers)
    return {**result.metrics, **metrics}
