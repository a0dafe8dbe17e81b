"""Step cost of candidate backbones for the learning-curve grid (configs/compare/curves.yaml), and
the grid's estimated wall time from it.

A student training step (forward, backward, SGD step) and a teacher forward pass (eval, no grad) are
timed in process CPU time, one torch thread, on random 3-channel batches, for every (arch, tile size)
candidate, interleaved over rounds so that load from other processes hits all alike. CPU time, not
wall time: on a shared machine only it is stable. The grid estimate multiplies the measured cost by
the grid's steps and cells; a method's step = student step + its teacher passes (MoMA: two with a
same-task teacher, one otherwise) + the method's own extras (from BENCHMARKS.md, "Training
throughput": +4 % for CRD and MoMA's heads over KD).

    python benchmarks/curve_budget.py                     # about 1-2 minutes on a shared 2-core machine
    python benchmarks/curve_budget.py --archs resnet10t --sizes 48,64 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def cpu_seconds(fn, repeats: int) -> float:
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="resnet10t,resnet18")
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from moma.models.backbone import create_backbone

    candidates = [(a, int(s)) for a in args.archs.split(",") for s in args.sizes.split(",")]
    step_costs: dict = {c: [] for c in candidates}
    teacher_costs: dict = {c: [] for c in candidates}
    runners = {}
    for arch, size in candidates:
        torch.manual_seed(0)
        student, teacher = create_backbone(arch, 3), create_backbone(arch, 3).eval()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        images, targets = torch.randn(args.batch_size, 3, size, size), torch.randint(0, 3, (args.batch_size,))

        def step(student=student, optimizer=optimizer, images=images, targets=targets):
            loss = torch.nn.functional.cross_entropy(student(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def teach(teacher=teacher, images=images):
            with torch.no_grad():
                teacher(images)

        step(), teach()  # warm-up
        runners[(arch, size)] = (step, teach)
    for round_index in range(args.rounds):
        order = candidates[round_index % len(candidates):] + candidates[:round_index % len(candidates)]
        for candidate in order:
            step, teach = runners[candidate]
            step_costs[candidate].append(cpu_seconds(step, args.steps))
            teacher_costs[candidate].append(cpu_seconds(teach, args.steps))
    print(f"torch {torch.__version__}, 1 thread, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps; "
          "process CPU seconds (median)")
    print("| arch | tile px | student step s | teacher pass s | step vs resnet18 at the same size |")
    print("|---|---|---|---|---|")
    for arch, size in candidates:
        s, t = statistics.median(step_costs[(arch, size)]), statistics.median(teacher_costs[(arch, size)])
        ref = step_costs.get(("resnet18", size))
        ratio = f"{s / statistics.median(ref):.2f}x" if ref else "—"
        print(f"| {arch} | {size} | {s:.4f} | {t:.4f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
