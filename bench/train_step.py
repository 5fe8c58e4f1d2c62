"""Benchmark: one training step against its floor, side by side on the same batch.

The floor is one bare forward + backward of the frozen SAM image encoder on
the same images (the prompts need gradients through the encoder, so no
prompt-tuning step can be cheaper). The step is MMRAD's whole step: the
frozen CNNs of LPT, the prompted encoder forward + backward, both decoder
passes, the loss and the AdamW update. Measurements alternate (step, floor,
step, floor, ...) so machine noise hits both alike; medians are printed.

    .venv/bin/python bench/train_step.py                       # the CPU default (params.yaml)
    .venv/bin/python bench/train_step.py --encoder vit_b --image-size 1024 --cnn resnet50 --device cuda
    .venv/bin/python bench/train_step.py --flops --encoder vit_b --image-size 1024   # count FLOPs, no timing

``--flops`` builds the model on PyTorch's meta device and counts the
floating-point operations of step and floor with ``FlopCounterMode``: the
ratio the step would have on hardware that runs every operation at the
same speed (for the paper's profile, which this CPU cannot time usefully).
Target (issue 3): step <= 1.3x floor.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmrad.core.params import load_params
from mmrad.models.builder import model_config
from mmrad.models.mmrad import MMRAD
from mmrad.training.train import losses


def make_inputs(b: int, size: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {m: (torch.rand(b, 3, size, size, generator=g) * 255).to(device) for m in ("fundus", "oct")}
    for m in ("fundus", "oct"):
        mask = torch.zeros(b, size, size)
        mask[:, size // 4: size // 2, size // 4: size // 2] = 1
        batch[f"{m}_mask"] = mask.to(device)
    batch["label"] = torch.ones(b, device=device)
    return batch


def step_fn(model, optimiser, batch, autocast):
    def run():
        with autocast:
            out = model(batch["fundus"], batch["oct"])
        loss = losses(out, batch, "ce")["loss"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return run


def floor_fn(model, batch, autocast):
    """The frozen encoder's forward + backward to its input, on the same 2B images."""
    images = torch.cat([batch["fundus"], batch["oct"]])

    def run():
        x = ((images - model.pixel_mean) / model.pixel_std).requires_grad_(True)
        with autocast:
            embedding = model.image_encoder(x)
        embedding.float().mean().backward()
    return run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    defaults = load_params().model
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=defaults.encoder)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--cnn", default=defaults.cnn)
    parser.add_argument("--batch", type=int, default=load_params().train.batch_size, help="cases (pairs) per step")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--flops", action="store_true", help="count FLOPs on the meta device instead of timing")
    args = parser.parse_args()
    # params.yaml's model section, with the encoder, size and CNN of this measurement
    config = replace(model_config(load_params("params.yaml")), encoder=args.encoder, image_size=args.image_size,
                     cnn=args.cnn)

    if args.flops:
        with torch.device("meta"):
            model = MMRAD(config).train()
            batch = make_inputs(args.batch, args.image_size, "meta")
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        counts = {}
        for name, fn in (("step", step_fn(model, optimiser, batch, torch.autocast("cpu", enabled=False))),
                         ("floor", floor_fn(model, batch, torch.autocast("cpu", enabled=False)))):
            with FlopCounterMode(display=False) as counter:
                fn()
            counts[name] = counter.get_total_flops()
        images = 2 * args.batch
        print(f"{args.encoder} @ {args.image_size}, {args.cnn} x2, batch {args.batch} pairs ({images} images): FLOPs")
        print(f"  step  {counts['step'] / images / 1e9:10.1f} GFLOP per image")
        print(f"  floor {counts['floor'] / images / 1e9:10.1f} GFLOP per image (frozen encoder fwd+bwd)")
        print(f"  ratio step / floor = {counts['step'] / counts['floor']:.2f}  (target <= 1.3)")
        return

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    torch.manual_seed(0)
    model = MMRAD(config).to(device).train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batch = make_inputs(args.batch, args.image_size, device)
    runs = {"step": step_fn(model, optimiser, batch, autocast), "floor": floor_fn(model, batch, autocast)}
    times = {name: [] for name in runs}
    for name, fn in runs.items():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - started)
    images = 2 * args.batch
    step, floor = statistics.median(times["step"]), statistics.median(times["floor"])
    print(f"{args.encoder} @ {args.image_size}, {args.cnn} x2, batch {args.batch} pairs ({images} images), "
          f"{device.type}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  step   {step * 1000:9.1f} ms  ({images / step:7.1f} images/s)")
    print(f"  floor  {floor * 1000:9.1f} ms  ({images / floor:7.1f} images/s)")
    print(f"  ratio step / floor = {step / floor:.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
