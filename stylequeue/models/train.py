"""Unpaired CycleGAN training from a recipe file (`stylequeue train RECIPE`), in Paddle's dynamic graph.

The model is the CycleGAN paper's: generators G_A (A->B) and G_B (B->A) (`ResnetGenerator`), 70x70
PatchGAN discriminators D_A (judges G_A's output against real B) and D_B, LSGAN (MSE) losses, cycle L1
weighted `lambda_cycle`, identity L1 weighted `lambda_identity * lambda_cycle`, image pools of
`pool_size` fakes for the discriminators, Adam, and a learning rate that is constant until `decay_start`
and then decays linearly (or along a cosine) to zero at `steps`.

Checkpoints use PaddleGAN's layout (`netG_A`, `netG_B`, `netD_A`, `netD_B`, optimiser states `optimG`,
`optimD`) plus `step` and the `recipe`. Optimiser entries are keyed by network and parameter key
(`netG_A.model.1.weight_moment1_0`) instead of Paddle's process-global parameter names, so they restore
in any process. Paddle is imported inside the functions: reading a recipe needs none.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stylequeue.errors import ConfigError, PaddleMissing
from stylequeue.models.recipe import Recipe, learning_rate, load_recipe, registry_snippet

if TYPE_CHECKING:
    import paddle
    from rich.console import Console

    from stylequeue.models.dataset import Batch
    from stylequeue.models.discriminator import ImagePool

NETS = ("netG_A", "netG_B", "netD_A", "netD_B")


@dataclass(frozen=True)
class TrainResult:
    """What a `train()` call left behind."""

    checkpoint_path: Path  # full training state (PaddleGAN layout), for resume
    weights_path: Path  # bare AtoB generator state dict: what a styles registry points at
    steps_done: int  # total steps trained, across resumes
    registry_toml: str  # the `[styles.NAME]` entry for the trained generator
    losses: dict[str, float]  # the last step's losses: G, D, cycle, idt (and paired when used)


def train(
    recipe_path: str | Path, *, resume: bool = True, max_steps: int | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train (or continue training) the CycleGAN a recipe describes; returns where everything went.

    Args:
        resume: continue from `output_dir/checkpoint.pdparams` when it exists (step count, optimiser
            state and learning-rate schedule carry on); False starts over and overwrites it.
        max_steps: stop after this many steps in this call (the schedule still spans `steps`).
        console: a Rich console for the progress bar and messages (default: stdout).
    """
    recipe = load_recipe(recipe_path)
    if recipe.threads and "paddle" not in sys.modules:
        # oneDNN reads OMP_NUM_THREADS when Paddle loads; set_num_threads covers the BLAS side.
        os.environ.setdefault("OMP_NUM_THREADS", str(recipe.threads))
    try:
        import paddle
    except ImportError:
        raise PaddleMissing() from None
    from rich.console import Console

    from stylequeue.models.dataset import UnpairedImages
    from stylequeue.models.discriminator import ImagePool

    console = console or Console()
    on_gpu = _select_device(recipe)
    if recipe.threads and not on_gpu:
        paddle.base.core.set_num_threads(recipe.threads)
    if recipe.amp and not on_gpu:
        warnings.warn("recipe asks for amp, which needs a GPU: training in fp32 on the CPU", stacklevel=2)
    try:
        data = UnpairedImages(
            recipe.data_dir / "trainA", recipe.data_dir / "trainB", crop_size=recipe.crop_size,
            load_size=recipe.load_size, flip=recipe.flip, seed=recipe.seed,
            paired=recipe.lambda_paired_l1 > 0,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"recipe {recipe_path}: field 'data_dir': {exc}") from None
    nets = _build_nets(recipe)
    trainable = {key: [p for p in net.parameters() if not p.stop_gradient] for key, net in nets.items()}
    optims = {
        f"optim{kind}": paddle.optimizer.Adam(
            learning_rate=recipe.lr, beta1=recipe.beta1, beta2=0.999,
            parameters=trainable[f"net{kind}_A"] + trainable[f"net{kind}_B"],
        )
        for kind in ("G", "D")
    }
    checkpoint = recipe.output_dir / "checkpoint.pdparams"
    step = _restore(checkpoint, nets, optims) if resume and checkpoint.exists() else 0
    rng = random.Random(f"{recipe.seed}:{step}")  # pools start empty on resume, as in PaddleGAN
    pools = {"fake_b": ImagePool(recipe.pool_size, rng), "fake_a": ImagePool(recipe.pool_size, rng)}
    scalers = {k: paddle.amp.GradScaler() for k in optims} if recipe.amp and on_gpu else None
    end = recipe.steps if max_steps is None else min(recipe.steps, step + max_steps)
    losses: dict[str, float] = {}
    with _Progress(console, recipe, step, end) as progress:
        while step < end:
            for optim in optims.values():
                optim.set_lr(learning_rate(recipe, step))
            batch = data.sample(step, recipe.batch_size)
            losses = _train_step(recipe, nets, trainable, optims, pools, batch, scalers)
            step += 1
            progress.advance(step, losses)
            if step % recipe.checkpoint_every == 0 and step < end:
                _save_checkpoint(checkpoint, nets, optims, step, recipe)
    _save_checkpoint(checkpoint, nets, optims, step, recipe)
    weights = recipe.output_dir / f"{recipe.name}.pdparams"
    _atomic_save(nets["netG_A"].state_dict(), weights)
    snippet = registry_snippet(recipe, weights)
    console.print(f"trained {step}/{recipe.steps} steps; checkpoint {checkpoint}\nregistry entry:\n")
    console.print(snippet, markup=False, highlight=False, soft_wrap=True)
    return TrainResult(checkpoint, weights, step, snippet, losses)


def _select_device(recipe: Recipe) -> bool:
    """Train on the GPU when this Paddle has one (unless the recipe says cpu); returns whether it does."""
    import paddle

    gpu_ok = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if recipe.device == "gpu" and not gpu_ok:
        raise ConfigError("recipe field 'device' is gpu, but this Paddle build sees no GPU")
    on_gpu = gpu_ok and recipe.device != "cpu"
    paddle.set_device("gpu" if on_gpu else "cpu")
    return on_gpu


def _build_nets(recipe: Recipe) -> dict[str, paddle.nn.Layer]:
    """G_A, G_B, D_A, D_B with CycleGAN's initialisation: conv weights N(0, 0.02), biases 0."""
    import paddle
    from paddle import nn

    from stylequeue.models.discriminator import NLayerDiscriminator
    from stylequeue.models.generator import ResnetGenerator

    paddle.seed(recipe.seed)
    nets: dict[str, nn.Layer] = {
        "netG_A": ResnetGenerator(ngf=recipe.ngf, n_blocks=recipe.n_blocks),
        "netG_B": ResnetGenerator(ngf=recipe.ngf, n_blocks=recipe.n_blocks),
        "netD_A": NLayerDiscriminator(ndf=recipe.ndf, n_layers=recipe.n_layers),
        "netD_B": NLayerDiscriminator(ndf=recipe.ndf, n_layers=recipe.n_layers),
    }
    normal, zero = nn.initializer.Normal(0.0, 0.02), nn.initializer.Constant(0.0)
    for net in nets.values():
        for layer in net.sublayers():
            if isinstance(layer, (nn.Conv2D, nn.Conv2DTranspose)):
                normal(layer.weight)
                if layer.bias is not None:
                    zero(layer.bias)
    return nets


def _lsgan(scores: paddle.Tensor, real: bool) -> paddle.Tensor:
    import paddle

    return paddle.nn.functional.mse_loss(scores, paddle.full_like(scores, 1.0 if real else 0.0))


def _train_step(
    recipe: Recipe, nets: dict[str, Any], trainable: dict[str, list[Any]], optims: dict[str, Any],
    pools: dict[str, ImagePool], batch: Batch, scalers: dict[str, Any] | None,
) -> dict[str, float]:
    """One CycleGAN step: generators first (discriminators frozen), then discriminators on pooled fakes."""
    import paddle
    from paddle.nn.functional import l1_loss

    real_a, real_b = paddle.to_tensor(batch.real_a), paddle.to_tensor(batch.real_b)
    g_a, g_b, d_a, d_b = (nets[k] for k in NETS)
    d_params = trainable["netD_A"] + trainable["netD_B"]
    for p in d_params:
        p.stop_gradient = True
    with paddle.amp.auto_cast(enable=scalers is not None):
        fake_b, fake_a = g_a(real_a), g_b(real_b)
        adv = _lsgan(d_a(fake_b), True) + _lsgan(d_b(fake_a), True)
        cycle = (l1_loss(g_b(fake_b), real_a) + l1_loss(g_a(fake_a), real_b)) * recipe.lambda_cycle
        idt = paired = paddle.zeros([])
        if recipe.lambda_identity > 0:
            weight = recipe.lambda_cycle * recipe.lambda_identity
            idt = (l1_loss(g_a(real_b), real_b) + l1_loss(g_b(real_a), real_a)) * weight
        if recipe.lambda_paired_l1 > 0:  # the batch's B is then A's transformed twin
            paired = (l1_loss(fake_b, real_b) + l1_loss(fake_a, real_a)) * recipe.lambda_paired_l1
        loss_g = adv + cycle + idt + paired
    _backward_step(loss_g, optims["optimG"], scalers and scalers["optimG"])
    for p in d_params:
        p.stop_gradient = False
    with paddle.amp.auto_cast(enable=scalers is not None):
        pooled_b, pooled_a = pools["fake_b"].query(fake_b.detach()), pools["fake_a"].query(fake_a.detach())
        loss_d = 0.5 * (_lsgan(d_a(real_b), True) + _lsgan(d_a(pooled_b), False)) + 0.5 * (
            _lsgan(d_b(real_a), True) + _lsgan(d_b(pooled_a), False))
    _backward_step(loss_d, optims["optimD"], scalers and scalers["optimD"])
    values = {"G": adv, "D": loss_d, "cycle": cycle, "idt": idt}
    if recipe.lambda_paired_l1 > 0:
        values["paired"] = paired
    return {k: float(v) for k, v in values.items()}


def _backward_step(loss: paddle.Tensor, optim: Any, scaler: Any | None) -> None:
    if scaler is None:
        loss.backward()
        optim.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()
    optim.clear_grad()


def _param_names(nets: dict[str, Any]) -> dict[str, str]:
    """Paddle's process-global parameter name -> stable `netX.key` name."""
    return {p.name: f"{net}.{key}" for net, layer in nets.items() for key, p in layer.state_dict().items()}


def _rename_prefixes(state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Rename optimiser entries `<param>_<accumulator>` through `names`; other entries pass unchanged."""
    prefixes = sorted(names, key=len, reverse=True)
    renamed = {}
    for key, value in state.items():
        old = next((p for p in prefixes if key.startswith(p + "_")), None)
        renamed[names[old] + key[len(old):] if old else key] = value
    return renamed


def _atomic_save(obj: Any, path: Path) -> None:
    """paddle.save to a temporary file beside `path`, then rename: readers never see half a file."""
    import paddle

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        paddle.save(obj, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_checkpoint(
    path: Path, nets: dict[str, Any], optims: dict[str, Any], step: int, recipe: Recipe
) -> None:
    names = _param_names(nets)
    state: dict[str, Any] = {key: net.state_dict() for key, net in nets.items()}
    state.update({key: _rename_prefixes(opt.state_dict(), names) for key, opt in optims.items()})
    recipe_values = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(recipe).items()}
    state.update(step=step, recipe=recipe_values)
    _atomic_save(state, path)


def _restore(path: Path, nets: dict[str, Any], optims: dict[str, Any]) -> int:
    """Load a checkpoint into the nets and optimisers; returns its step count."""
    import paddle

    state = paddle.load(str(path))
    for key, net in nets.items():
        stored = state.get(key)
        if not isinstance(stored, dict):
            raise ConfigError(f"checkpoint {path} has no {key!r}; delete it or train with resume off")
        for name, param in net.state_dict().items():
            found = list(stored[name].shape) if name in stored else None
            if found != list(param.shape):
                raise ConfigError(f"checkpoint {path} does not fit the recipe ({key}.{name}: expected shape "
                                  f"{list(param.shape)}, found {found}); delete it or train with resume off")
        net.set_state_dict(stored)
    current = {stable: name for name, stable in _param_names(nets).items()}
    for key, optim in optims.items():
        optim.set_state_dict(_rename_prefixes(state[key], current))
    return int(state["step"])


class _Progress:
    """A Rich progress bar with live losses and s/step; plain log lines when not on a terminal."""

    def __init__(self, console: Console, recipe: Recipe, start: int, end: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console, self.recipe, self.start, self.end = console, recipe, start, end
        self.plain = not console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
            console=console, disable=self.plain,
        )
        self.task = self.progress.add_task(
            recipe.name, total=recipe.steps, completed=start, rate="", losses="")
        self.log = recipe.output_dir / "losses.csv"
        self.seconds_per_step: float | None = None
        self.last = time.perf_counter()

    def __enter__(self) -> _Progress:
        self.progress.start()
        if self.plain and self.start < self.end:
            self.console.print(f"{self.recipe.name}: steps {self.start} -> {self.end} of {self.recipe.steps}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def advance(self, step: int, losses: dict[str, float]) -> None:
        now = time.perf_counter()
        took, self.last = now - self.last, now
        if step > self.start + 1:  # the first step pays one-off setup: keep it out of the average
            previous = self.seconds_per_step
            self.seconds_per_step = took if previous is None else 0.9 * previous + 0.1 * took
        rate = f"{self.seconds_per_step:.2f} s/step" if self.seconds_per_step else ""
        text = "  ".join(f"{k} {v:.3f}" for k, v in losses.items())
        self.progress.update(self.task, completed=step, rate=rate, losses=text)
        if step % self.recipe.log_every and step != self.end:
            return
        if self.plain:
            line = f"step {step}/{self.recipe.steps}  {rate}  {text}"
            self.console.print(line, highlight=False, soft_wrap=True)
        new = not self.log.exists()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as fh:
            if new:
                fh.write("step,lr," + ",".join(losses) + ",s_per_step\n")
            values = ",".join(f"{v:.5f}" for v in losses.values())
            lr = learning_rate(self.recipe, step - 1)
            fh.write(f"{step},{lr:.3g},{values},{self.seconds_per_step or 0:.3f}\n")
