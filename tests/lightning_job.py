"""Run as ``python lightning_job.py STRATEGY OUT`` by test_integration_lightning.py.

A two-process CPU ``Trainer.fit`` of a small model (Lightning starts the second process) with
:class:`distclip.integrations.lightning.GlobalNormClipping`, ``groups="modules"`` where the
strategy supports it (not FSDP1).  Each step, before the callback clips, the float64 reference
norms of the full gradients (all of them, and each child of the LightningModule) are taken;
each rank writes the steps' reference norms, the norms the callback logged and its clipper saw,
and the collectives of its clip to ``OUT/rank{r}.json``.  Then, in the same processes, a fit the
callback must refuse (``Trainer(gradient_clip_val=...)`` beside it): the error each rank
raised, and whether any step ran, go under ``refused``.
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import MLP  # noqa: E402
from reference import collectives, full_grads, reference_norm  # noqa: E402

from distclip.integrations.lightning import GlobalNormClipping  # noqa: E402

MAX_NORM = 0.05
PREFIXES = ("_forward_module.", "_fsdp_wrapped_module.", "module.")
CHILDREN = ("encoder", "head")  # the LightningModule's: the names of groups="modules"
# the rows record the class of the encoder's first layer: Linear, FullyShardedDataParallel, FSDPLinear


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = MLP(depth=3)
        self.head = nn.Linear(1, 4)

    def configure_model(self):
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            # FSDP1 wrapped here because the strategy would pass device_id=None on CPU (torch:
            # "FSDP needs a non-CPU accelerator device"); it then leaves the wrapped model as is.
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            for index, layer in enumerate(self.encoder.layers):
                self.encoder.layers[index] = FSDP(layer, device_id=torch.device("cpu"), use_orig_params=True)
            self.encoder = FSDP(self.encoder, device_id=torch.device("cpu"), use_orig_params=True)
            self.head = FSDP(self.head, device_id=torch.device("cpu"), use_orig_params=True)
        mesh = getattr(self, "device_mesh", None)  # ModelParallelStrategy's: FSDP2 over data_parallel
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            for layer in self.encoder.layers:
                fully_shard(layer, mesh=mesh["data_parallel"])
            fully_shard(self.encoder, mesh=mesh["data_parallel"])
            fully_shard(self.head, mesh=mesh["data_parallel"])

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, _):
        (x,) = batch
        return (self(x) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(GlobalNormClipping):
    """The callback under test, with the reference taken just before it clips."""

    def __init__(self, groups) -> None:
        super().__init__(MAX_NORM, groups=groups)
        self.rows = []
        self.batches = 0  # training steps begun

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        full = full_grads(self._full_named_grads(pl_module))
        expected = reference_norm(full, 2.0)
        expected_groups = {child: reference_norm({n: g for n, g in full.items() if n.split(".")[0] == child}, 2.0)
                           for child in CHILDREN}
        with collectives() as issued:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        metrics = trainer.callback_metrics
        self.rows.append(dict(expected=expected, ours=self.clipper.last.total_norm.item(),
                              logged=float(metrics["grad_norm"]), collectives=issued,
                              kind=type(pl_module.encoder.layers[0]).__name__,
                              expected_groups=expected_groups,
                              logged_groups={k.split("/", 1)[1]: float(v) for k, v in metrics.items()
                                             if k.startswith("grad_norm/")}))

    def _full_named_grads(self, pl_module):
        """(name, gradient) of the whole model; FSDP1's unsharded with its full parameters."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not isinstance(pl_module.encoder, FSDP):
            return [(self._clean(n), p.grad) for n, p in pl_module.named_parameters()]
        with FSDP.summon_full_params(pl_module, with_grads=True):
            return [(self._clean(n), p.grad.clone()) for n, p in pl_module.named_parameters()]

    @staticmethod
    def _clean(name: str) -> str:
        for prefix in PREFIXES:
            name = name.replace(prefix, "")
        return name


def _strategy(name: str):
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        class CPUFSDPStrategy(FSDPStrategy):
            """Lightning's FSDPStrategy, unchanged.  Its accelerator check (``type(strategy) is
            FSDPStrategy`` and not CUDA: "requires a GPU accelerator") is the only thing that
            keeps it off the CPU, where torch's FSDP runs on gloo; a subclass passes it."""

        return CPUFSDPStrategy()
    if name == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return name


def fabric_main(out: str) -> None:
    """Fabric, DDP on two CPU processes: the same model and data, clipped each step by
    :func:`distclip.integrations.lightning.clip_gradients`."""
    from lightning.fabric import Fabric

    from distclip.integrations.lightning import clip_gradients

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    module = Model()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    model, optimizer = fabric.setup(module, optimizer)
    generator = torch.Generator().manual_seed(1234)
    data = torch.randn(32, 16, generator=generator) * 3
    rows = []
    for step in range(4):
        # Each rank its own half of each batch of 8 rows.
        x = data[step * 8 : (step + 1) * 8][fabric.global_rank :: 2]
        optimizer.zero_grad()
        fabric.backward((model(x) ** 2).mean())  # through the DDP wrapper: its all-reduce
        expected = reference_norm(full_grads([(n, p.grad) for n, p in module.named_parameters()]), 2.0)
        with collectives() as issued:
            norm = clip_gradients(fabric, model, optimizer, MAX_NORM)
        rows.append(dict(expected=expected, ours=norm.item(), logged=norm.item(), collectives=issued, kind="fabric"))
        optimizer.step()
    with open(os.path.join(out, f"rank{fabric.global_rank}.json"), "w") as f:
        json.dump(dict(rows=rows), f)


def _trainer(strategy: str, callback, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=_strategy(strategy), max_steps=4, callbacks=[callback],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


def _refused(strategy: str, data) -> dict:
    """A fit GlobalNormClipping must refuse on this rank: its error, and whether a step ran."""
    callback, kwargs = Recorder(groups=None), {"gradient_clip_val": 0.1}
    try:
        _trainer(strategy, callback, **kwargs).fit(Model(), data)
    except ValueError as error:
        return dict(error=str(error), steps=callback.batches)
    return dict(error=None, steps=callback.batches)


def main(strategy: str, out: str) -> None:
    if strategy == "fabric":
        return fabric_main(out)
    generator = torch.Generator().manual_seed(1234)
    data = DataLoader(TensorDataset(torch.randn(32, 16, generator=generator) * 3), batch_size=4, shuffle=False)
    recorder = Recorder(groups="modules")
    trainer = _trainer(strategy, recorder)
    trainer.fit(Model(), data)
    refused = _refused(strategy, data)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(dict(rows=recorder.rows, refused=refused), f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
