"""Training-step time and memory of the production model, criterion and optimizer.

One iteration is what ``gdistill.engine.trainer.train`` does per step, built from the trainer's own
pieces (``build_model``, ``build_criterion``, ``build_optimizer``, ``build_scheduler``,
``_split_outputs``, ``_sum_losses``, ``freeze``, ``ema_update``, ``pseudo_labels_from_teacher``),
on synthetic data: random uint8 images and ~5 random elliptical instance masks per image at full
input resolution (no dataset, no data loader; data creation is not timed).

- ``--stage teacher``: stage A (labelled loss only).
- ``--stage inference``: one forward in eval mode under ``no_grad`` of ``--batch`` images: what
  evaluation, ``gdistill predict`` and the stage-B teacher do per batch.
- ``--stage distill``: stage B in its EMA phase: EMA update of the teacher, teacher forward on the
  weak view (eval mode, no_grad), pseudo-labels, ONE student forward over [labelled; strong], both
  losses (unsup weight ``--unsup-weight``), backward, grad clipping, AdamW step.

The randomly initialised teacher would never be confident enough to produce pseudo-labels, which
would make the unlabelled loss almost free. Its class head is therefore calibrated once on a
calibration batch (logits scaled, no-object bias shifted) so that about ``--pl-per-image``
queries per image pass the production filter; the JSON reports the count actually kept.

Prints ONE JSON line: ``sec_per_iter`` (median wall time over the iterations after ``--warmup``),
``cpu_sec_per_iter`` (median process CPU time: the robust number on a shared machine, where
preemption inflates wall time), ``peak_rss_gib`` (ru_maxrss), RSS after warm-up / at the end, its
growth per iteration (least-squares slope over the timed iterations), RSS at ``--rss-at``
iterations, minor page faults per iteration, CUDA peak memory on CUDA, the config and the load.

    python benchmarks/step_time.py --stage teacher --backbone resnet50 --size 256 --batch 2 --iters 20
    python benchmarks/step_time.py --stage distill ... --profile   # phase / module / op breakdown
                                                                   # to stderr after the warm-up
    python benchmarks/step_time.py --stage distill ... --phases    # the same without the op table

On a CPU shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE`` (see BENCHMARKS.md): with
the default spinning policy a 2-thread run can be 10-25x slower when another process holds a core.
``--amp`` follows the trainer: autocast on CUDA only, CPU always runs fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict

import torch

from gdistill.config import Config, load_config
from gdistill.distill.ema import ema_update
from gdistill.distill.pseudo_labels import pseudo_labels_from_teacher
from gdistill.engine.allocator import keep_freed_memory
from gdistill.engine.evaluate import autocast_for
from gdistill.engine.optim import build_optimizer, build_scheduler
from gdistill.engine.trainer import _split_outputs, _sum_losses, build_criterion, freeze
from gdistill.model import token_linear
from gdistill.model.mask2former import build_model, images_to_model_input

NUM_CLASSES = 80
GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("teacher", "distill", "inference"), default="teacher")
    p.add_argument("--config", default="",
                   help="a preset name (e.g. demo) or YAML file: model, loss, solver, distill and "
                        "input sizes come from it, and --backbone/--size/--batch/--queries/"
                        "--dec-layers/--points/--hidden/--train-bn are ignored")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=256, help="square crop side (multiple of 32)")
    p.add_argument("--batch", type=int, default=2, help="labelled (and unlabelled) images per step")
    p.add_argument("--iters", type=int, default=20, help="iterations after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--dec-layers", type=int, default=9)
    p.add_argument("--points", type=int, default=12544)
    p.add_argument("--hidden", type=int, default=256, help="hidden_dim = mask_dim = pixel decoder width")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc malloc's defaults (the trainer keeps freed memory for reuse: "
                        "gdistill.engine.allocator)")
    p.add_argument("--train-bn", action="store_true",
                   help="model.frozen_bn=false: train the backbone's BatchNorm (default: frozen, as "
                   "the paper's COCO R50)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--instances", type=int, default=5, help="ground-truth masks per image (mean)")
    p.add_argument("--pl-per-image", type=float, default=6.0,
                   help="calibration target of pseudo-labels per image (the filter keeps ~5 of 6)")
    p.add_argument("--unsup-weight", type=float, default=None, help="default: the config's (2.0)")
    p.add_argument("--ema-decay", type=float, default=None, help="default: the config's (0.9996)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-at", default="", help="comma-separated iterations (1-based, counting "
                   "warm-up) at which to report RSS, e.g. 50,250,500")
    p.add_argument("--profile", action="store_true", help="phase/module/op breakdown to stderr")
    p.add_argument("--phases", action="store_true",
                   help="phase/module breakdown to stderr, without torch.profiler (less overhead)")
    p.add_argument("--profile-iters", type=int, default=3)
    p.add_argument("--linear", choices=("auto", "onednn", "blas"), default="auto",
                   help="the pixel decoder's linears: gdistill.model.token_linear's choice for this "
                        "CPU, or forced through oneDNN / F.linear")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    """The step's config: the paper's defaults shaped by the flags, or ``--config``, whose sizes
    are then written back into ``args`` (the data and the JSON report read them there)."""
    if args.config:
        cfg = load_config(args.config)
        args.backbone, args.size = cfg.model.backbone, cfg.data.image_size
        args.batch, args.queries = cfg.data.batch_size, cfg.model.num_queries
        args.dec_layers, args.points = cfg.model.dec_layers, cfg.loss.num_points
        args.hidden, args.train_bn = cfg.model.hidden_dim, not cfg.model.frozen_bn
    else:
        cfg = Config()
        cfg.model.backbone = args.backbone
        cfg.model.pretrained = False
        cfg.model.backbone_weights = ""
        cfg.model.hidden_dim = args.hidden
        cfg.model.mask_dim = args.hidden
        cfg.model.num_queries = args.queries
        cfg.model.dec_layers = args.dec_layers
        cfg.model.frozen_bn = not args.train_bn
        cfg.loss.num_points = args.points
    cfg.device = args.device
    cfg.threads = args.threads
    cfg.model.num_classes = NUM_CLASSES
    cfg.solver.amp = args.amp
    cfg.solver.max_iters = 10**9  # the LR schedule stays in its first phase
    if args.unsup_weight is not None:
        cfg.distill.unsup_weight = args.unsup_weight
    if args.ema_decay is not None:
        cfg.distill.ema_decay = args.ema_decay
    return cfg


# ----------------------------------------------------------------------------- synthetic data


def random_masks(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """bool [n, size, size]: axis-aligned ellipses of random centre and radii (>= size/16)."""
    yy = torch.arange(size, dtype=torch.float32).view(-1, 1)
    xx = torch.arange(size, dtype=torch.float32).view(1, -1)
    masks = []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=g) * size).tolist()
        ry, rx = (size / 16 + torch.rand(2, generator=g) * size / 4).tolist()
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
    return torch.stack(masks)


def labelled_batch(args: argparse.Namespace, g: torch.Generator) -> dict:
    """What ``collate_labelled`` gives: uint8 images and per-image labels / full-resolution masks."""
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    targets = []
    for _ in range(args.batch):
        n = max(1, args.instances + int(torch.randint(-2, 3, (1,), generator=g)))
        targets.append(
            {
                "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                "masks": random_masks(n, args.size, g),
            }
        )
    return {"images": images, "targets": targets}


def unlabelled_batch(args: argparse.Namespace, g: torch.Generator) -> dict:
    """What ``collate_unlabelled`` gives (no padding: every pixel valid)."""
    shape = (args.batch, 3, args.size, args.size)
    return {
        "weak": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        "strong": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        "valid": torch.ones(args.batch, args.size, args.size, dtype=torch.bool),
    }


@torch.no_grad()
def calibrate_teacher(teacher: torch.nn.Module, weak: torch.Tensor, per_image: float) -> None:
    """Make the random teacher's class head confident on about ``per_image`` queries per image.

    The head's logits are scaled so that the margin (best real class − no-object) varies across
    queries with std 10, which makes the softmax nearly one-hot; the no-object bias is then
    raised so that the margin is positive for a fraction per_image / Q of the queries of the
    calibration batch."""
    head = teacher.decoder.class_embed
    logits = teacher(weak)["pred_logits"]  # [B, Q, K+1]
    margin = logits[..., :-1].max(-1).values - logits[..., -1]  # > 0: a real class wins
    scale = 10.0 / margin.std().clamp(min=1e-6)
    head.weight.mul_(scale)
    head.bias.mul_(scale)
    quantile = 1.0 - min(1.0, per_image / logits.shape[1])
    head.bias[-1] += torch.quantile((margin * scale).flatten().float(), quantile)


# ----------------------------------------------------------------------------- the step


class Phases:
    """Wall and process CPU time per named phase (synchronising CUDA), each also a torch.profiler
    label. CPU time is the robust measure on a shared machine: preemption inflates wall time."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.profiler.record_function(name):
            yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[name][0] += time.perf_counter() - t0
        self.totals[name][1] += time.process_time() - c0


class Step:
    """Mirrors the body of the ``for step in range(start_step, max_iters)`` loop of
    ``gdistill.engine.trainer.train`` (EMA update → teacher / pseudo-labels → one student forward
    over [labelled; strong] → losses → finite check → zero_grad → backward → clip → step →
    scheduler → ``.item()`` logging), for the EMA phase of stage B and for stage A."""

    def __init__(self, args: argparse.Namespace, cfg: Config, device: torch.device, phases: Phases):
        self.args, self.cfg, self.device, self.phase = args, cfg, device, phases
        # trainer.train: build_model / build_criterion / build_optimizer / build_scheduler / GradScaler
        self.student = build_model(cfg.model, NUM_CLASSES).to(device).train()
        self.criterion = build_criterion(cfg, NUM_CLASSES).to(device)
        solver = cfg.solver
        self.optimizer = build_optimizer(
            self.student, solver.lr, solver.weight_decay, solver.backbone_lr_mult
        )
        self.scheduler = build_scheduler(self.optimizer, solver)
        self.use_scaler = device.type == "cuda" and solver.amp == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.teacher = None
        if args.stage == "distill":
            # trainer.train: the teacher is its own module, frozen, in eval mode.
            self.teacher = freeze(build_model(cfg.model, NUM_CLASSES)).to(device)
        self.pl_kept: list[float] = []

    def __call__(self, batch: dict, ubatch: dict | None) -> float:
        cfg, device, dist, phase = self.cfg, self.device, self.cfg.distill, self.phase
        if self.args.stage == "inference":
            with phase("inference"), torch.no_grad(), autocast_for(device, cfg.solver.amp):
                images = images_to_model_input(batch["images"].to(device, non_blocking=True))
                return self.student.eval()(images)["pred_masks"].float().mean().item()
        if self.teacher is not None:
            with phase("ema_update"):
                ema_update(self.teacher, self.student, dist.ema_decay)
        with phase("inputs"):
            images = images_to_model_input(batch["images"].to(device, non_blocking=True))
            targets = [{"labels": t["labels"].to(device), "masks": t["masks"].to(device)}
                       for t in batch["targets"]]
        unsup_targets = None
        if ubatch is not None:
            with phase("teacher_forward"), torch.no_grad():
                weak = images_to_model_input(ubatch["weak"].to(device, non_blocking=True))
                t_out = self.teacher(weak)
            with phase("pseudo_labels"), torch.no_grad():
                unsup_targets, stats = pseudo_labels_from_teacher(
                    t_out["pred_logits"],
                    t_out["pred_masks"],
                    dist.score_threshold,
                    dist.min_mask_area,
                    dist.mask_threshold,
                    ubatch["valid"].to(device),
                    duplicate_iou=dist.duplicate_iou,
                )
                self.pl_kept.append(stats["pl_per_image"])
            for t in unsup_targets:
                t.pop("scores")
            strong = images_to_model_input(ubatch["strong"].to(device, non_blocking=True))

        with phase("norm_stats"):  # trainer: BN statistics saved in case the step is skipped
            norm_stats = {
                k: b.clone() for k, b in self.student.named_buffers() if "running" in k or "num_batches" in k
            }
        with autocast_for(device, cfg.solver.amp):
            with phase("student_forward"):
                if unsup_targets is not None:
                    outputs = self.student(torch.cat([images, strong]))
                    sup_out, unsup_out = _split_outputs(outputs, images.shape[0])
                else:
                    sup_out, unsup_out = self.student(images), None
            with phase("criterion"):
                sup_losses = self.criterion(sup_out, targets)
                loss_sup = _sum_losses(sup_losses)
                loss = loss_sup
                loss_unsup = torch.zeros((), device=device)
                if unsup_out is not None:
                    loss_unsup = dist.unsup_weight * _sum_losses(self.criterion(unsup_out, unsup_targets))
                    loss = loss + loss_unsup

        if not torch.isfinite(loss.detach()):
            raise RuntimeError("non-finite loss in the benchmark")
        del norm_stats
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with phase("clip_grad"):
            if cfg.solver.clip_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.solver.clip_grad_norm)
        with phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        with phase("logging"):
            values = {"loss": loss.item(), "loss_sup": loss_sup.item(), "loss_unsup": loss_unsup.item()}
            for key in ("loss_ce", "loss_mask", "loss_dice"):
                values[key] = sup_losses[key].item()
        return values["loss"]


# ----------------------------------------------------------------------------- measurement


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / GIB


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def slope(values: list[float]) -> float:
    """Least-squares slope of values against their index."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def module_timers(named: dict[str, list[torch.nn.Module]], totals: dict[str, list[float]]) -> list:
    """Forward wall / CPU time of groups of modules via hooks (CPU: synchronous)."""
    handles = []
    for name, modules in named.items():
        for module in modules:
            start: list[float] = [0.0, 0.0]

            def pre(_m, _i, start=start):
                start[:] = [time.perf_counter(), time.process_time()]

            def post(_m, _i, _o, name=name, start=start):
                totals[name][0] += time.perf_counter() - start[0]
                totals[name][1] += time.process_time() - start[1]

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _timed_modules(step: Step) -> dict[str, list[torch.nn.Module]]:
    from gdistill.model.pixel_decoder import MSDeformAttn

    named: dict[str, list[torch.nn.Module]] = {"criterion.matcher": [step.criterion.matcher]}
    models = {"student": step.student}
    if step.teacher is not None:
        models["teacher"] = step.teacher
    for prefix, model in models.items():
        for name in ("backbone", "pixel_decoder", "decoder"):
            named[f"{prefix}.{name}"] = [getattr(model, name)]
        named[f"{prefix}.pixel_decoder.ms_deform_attn"] = [
            m for m in model.modules() if isinstance(m, MSDeformAttn)
        ]
    return named


def _print_times(title: str, totals: dict[str, list[float]], n: int, wall: float, cpu: float) -> None:
    print(f"== {title}: wall s/iter, CPU s/iter, share of CPU", file=sys.stderr)
    for name, (w, c) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<32s} {w / n:8.3f} {c / n:8.3f}  {100 * c / cpu:5.1f}%", file=sys.stderr)


def run_profile(step: Step, batches: list, ubatches: list, args: argparse.Namespace) -> None:
    """Phase and module times over --profile-iters steps, then the top ops by self time."""
    modules: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    handles = module_timers(_timed_modules(step), modules)
    step.phase.enabled = True
    step.phase.totals.clear()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if step.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    ops = args.profile  # --phases: phase / module times only, without torch.profiler's overhead
    ctx = contextlib.nullcontext()
    if ops:
        ctx = torch.profiler.profile(activities=activities, record_shapes=True)
    with ctx as prof:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.profile_iters):
            step(batches[i % len(batches)], ubatches[i % len(ubatches)] if ubatches else None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for h in handles:
        h.remove()
    n = args.profile_iters
    what = "profiler overhead included" if ops else "hooks only"
    print(f"== profile: {n} iterations, {wall / n:.3f} s/iter wall, {cpu / n:.3f} s/iter CPU ({what})",
          file=sys.stderr)
    _print_times("phases", step.phase.totals, n, wall, cpu)
    _print_times("module forwards", modules, n, wall, cpu)
    if ops:
        sort_by = "self_cuda_time_total" if step.device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by=sort_by, row_limit=50, max_name_column_width=45, max_shapes_column_width=90),
            file=sys.stderr)
    step.phase.enabled = False


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.linear != "auto":
        token_linear.ONEDNN_LINEAR = args.linear == "onednn"
    # As the trainer does, unless --system-malloc (the comparison in BENCHMARKS.md).
    malloc_tuned = False if args.system_malloc else keep_freed_memory()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cfg = make_config(args)
    phases = Phases(device, enabled=False)
    step = Step(args, cfg, device, phases)

    g = torch.Generator().manual_seed(args.seed)
    pool = 4  # distinct batches cycled through (pre-built: data creation is not timed)
    batches = [labelled_batch(args, g) for _ in range(pool)]
    ubatches = [unlabelled_batch(args, g) for _ in range(pool)] if args.stage == "distill" else []
    if step.teacher is not None:
        calibrate_teacher(step.teacher, images_to_model_input(ubatches[0]["weak"].to(device)),
                          args.pl_per_image)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    rss_at = {int(x) for x in args.rss_at.split(",") if x.strip()}
    rss_report: dict[str, float] = {}
    times, cpu_times, rss, faults = [], [], [], []
    total = args.warmup + args.iters
    for i in range(total):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(batches[i % pool], ubatches[i % pool] if ubatches else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= args.warmup:
            times.append(dt)
            cpu_times.append(dc)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0)
            rss.append(current_rss_gib())
        if i + 1 in rss_at:
            rss_report[str(i + 1)] = round(current_rss_gib(), 4)
        if (args.profile or args.phases) and i + 1 == args.warmup:
            run_profile(step, batches, ubatches, args)

    result = {
        "stage": args.stage,
        "sec_per_iter": round(statistics.median(times), 4),
        "sec_per_iter_min": round(min(times), 4),
        "sec_per_iter_mean": round(statistics.fmean(times), 4),
        "cpu_sec_per_iter": round(statistics.median(cpu_times), 4),
        "peak_rss_gib": round(peak_rss_gib(), 4),
        "rss_after_warmup_gib": round(rss[0], 4),
        "rss_end_gib": round(rss[-1], 4),
        "rss_growth_mib_per_iter": round(slope(rss) * 1024, 3),
        "rss_gib_at": rss_report,
        "minor_faults_per_iter": int(statistics.median(faults)),
        "config": {
            k: getattr(args, k)
            for k in ("config", "backbone", "size", "batch", "iters", "warmup", "threads", "queries",
                      "dec_layers", "points", "hidden", "train_bn", "amp", "device", "instances", "seed")
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "malloc_keeps_freed_memory": malloc_tuned,
        "onednn_linear": token_linear.ONEDNN_LINEAR,
    }
    if args.stage == "distill":
        result["pl_per_image_mean"] = round(statistics.fmean(step.pl_kept), 2)
    if device.type == "cuda":
        result["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 4)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
