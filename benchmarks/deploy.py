"""Deployment throughput on CPU: the student in PyTorch eager vs ONNX Runtime, and teacher vs student.

One process, random weights (nothing is downloaded), a batch of shipped demo tiles
(``data/demo/glas_colon``) resized to ``--image-size`` and normalised as ``moma predict`` does:

- ``student eager``: the student checkpoint loaded as ``moma predict`` loads it, in
  ``torch.inference_mode``;
- ``student onnx``: the same checkpoint through ``moma export --dynamic-batch`` and ONNX Runtime
  (CPU execution provider, graph optimisations on);
- ``teacher eager``: the teacher network (e.g. ResNet-50 for a ResNet-18 student), eager.

The three run one after the other, interleaved over ``--rounds`` rounds with the order rotated
every round, so that load from other processes hits all alike. Tiles/s are given from wall-clock
time and from process CPU time (on a shared machine only the latter is stable); the ratios are
medians of the per-round ratios. Torch and ONNX Runtime get the same number of threads.

    python benchmarks/deploy.py                                    # resnet50 -> resnet18, 224 px
    python benchmarks/deploy.py --teacher efficientnet_b3 --student efficientnet_b0 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "glas_colon"
VARIANTS = ("student eager", "student onnx", "teacher eager")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="tiles per forward pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2, help="forward passes per variant and round")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--opset", type=int, default=17)
    return parser.parse_args()


def tile_batch(image_size: int, batch: int, mean, std) -> torch.Tensor:
    """The first ``batch`` demo tiles, resized and normalised like ``moma predict`` does."""
    from moma.config import AugmentConfig
    from moma.data.dataset import TileDataset
    from moma.data.tiles import scan_tiles
    from moma.data.transforms import build_eval_transform

    table = scan_tiles(DEMO)
    transform = build_eval_transform(AugmentConfig(mean=tuple(mean), std=tuple(std)))
    dataset = TileDataset(table, image_size, transform, cache=False)
    return torch.stack([dataset[i][0] for i in range(batch)])


def write_student(path: Path, arch: str, image_size: int, classes: list[str]) -> None:
    from moma.config import IMAGENET_MEAN, IMAGENET_STD
    from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
    from moma.models.backbone import create_backbone

    torch.manual_seed(0)
    model = create_backbone(arch, len(classes))
    save_model_checkpoint(path, model.state_dict(), ModelMetadata(arch, classes, image_size, list(IMAGENET_MEAN),
                                                                  list(IMAGENET_STD), method="none"))


def onnx_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def timed(run, reps: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``reps`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from moma.engine.export import export_onnx
    from moma.engine.inference import load_classifier
    from moma.models.backbone import create_backbone

    classes = ["benign", "malignant"]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, onnx_path = Path(tmp) / "student.safetensors", Path(tmp) / "student.onnx"
        write_student(checkpoint, args.student, args.image_size, classes)
        export_onnx(checkpoint, onnx_path, opset=args.opset, dynamic_batch=True)
        student, meta = load_classifier(checkpoint, torch.device("cpu"))
        session = onnx_session(onnx_path, args.threads)
        teacher = create_backbone(args.teacher, len(classes)).eval()
        images = tile_batch(args.image_size, args.batch, meta.mean, meta.std)
        array = images.numpy()

        def run_student() -> torch.Tensor:
            with torch.inference_mode():
                return student(images)

        def run_teacher() -> torch.Tensor:
            with torch.inference_mode():
                return teacher(images)

        runs = {"student eager": run_student, "student onnx": lambda: session.run(["logits"], {"input": array}),
                "teacher eager": run_teacher}
        onnx_probs = session.run(["probabilities"], {"input": array})[0]
        eager_probs = torch.softmax(run_student(), dim=1).numpy()
        parity = float(np.abs(onnx_probs - eager_probs).max())
        for run in runs.values():  # warm-up: allocations, ORT's first-run planning
            run()
        measured = measure(runs, args)
    report(measured, args, parity)


def measure(runs: dict, args) -> dict[str, list[tuple[float, float]]]:
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS)
    for _ in range(args.rounds):
        for name in order:
            measured[name].append(timed(runs[name], args.reps))
        order = order[1:] + order[:1]
    return measured


def report(measured: dict[str, list[tuple[float, float]]], args, parity: float) -> None:
    tiles = args.batch * args.reps

    def rate(name: str, kind: int) -> float:
        return statistics.median(tiles / sample[kind] for sample in measured[name])

    def ratio(top: str, bottom: str, kind: int) -> float:
        # tiles/s of top over tiles/s of bottom = time of bottom over time of top, per round
        return statistics.median(b[kind] / t[kind] for t, b in zip(measured[top], measured[bottom]))

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.image_size} px, batch {args.batch}, {args.rounds} rounds x {args.reps} passes; "
          f"max |delta prob| ONNX vs eager on the batch: {parity:.1e}\n")
    print("| model | tiles/s (wall) | tiles/s (CPU time) |\n|---|---|---|")
    names = {"student eager": f"student {args.student}, PyTorch eager", "student onnx": f"student {args.student}, ONNX Runtime",
             "teacher eager": f"teacher {args.teacher}, PyTorch eager"}
    for name in VARIANTS:
        print(f"| {names[name]} | {rate(name, 0):.1f} | {rate(name, 1):.1f} |")
    print("\n| ratio | wall | CPU time |\n|---|---|---|")
    print(f"| ONNX Runtime / eager (student) | {ratio('student onnx', 'student eager', 0):.2f} | "
          f"{ratio('student onnx', 'student eager', 1):.2f} |")
    print(f"| student / teacher (eager) | {ratio('student eager', 'teacher eager', 0):.2f} | "
          f"{ratio('student eager', 'teacher eager', 1):.2f} |")
    print(f"| student ONNX / teacher eager | {ratio('student onnx', 'teacher eager', 0):.2f} | "
          f"{ratio('student onnx', 'teacher eager', 1):.2f} |")


if __name__ == "__main__":
    main()
