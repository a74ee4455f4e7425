"""Metrics ride the norm's all-reduce: Sum, Mean, Max and Min of 0-dim tensors, identical on
every rank, at world 1, 2 and 4 under DDP, FSDP2 and pipeline-style groups (a rank may pass
none), against float64 references, one collective per step after the first step's agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from models import backward, batch, build, shard_layers
from reference import NoHostSync, by_case, clipper_step, collectives, every_case

STEPS = 3


def _value(rank: int, step: int, salt: float) -> float:
    return (rank + 1) * 1.25 + step * 0.5 + salt


def _metrics(kind: str):
    """Each rank passes tokens (Sum), z (Mean), max_logit (Max), min_margin (Min); in the
    pipeline-style run the odd ranks (stages without the loss) pass none."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build()
    wrapped = DDP(model) if kind == "ddp" else shard_layers(model) if kind == "fsdp2" else model
    replica_group = dist.new_subgroups(group_size=1)[0] if kind == "pipeline" else None
    clipper = distclip.GradClipper(wrapped, max_norm=1.0, replica_group=replica_group)
    passing = [r for r in range(world) if kind != "pipeline" or r % 2 == 0]
    results = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        backward(wrapped, batch(rank, seed=step))
        metrics = None
        if rank in passing:
            metrics = {
                "tokens": distclip.Sum(torch.tensor(_value(rank, step, 0.0))),
                "z": distclip.Mean(torch.tensor(_value(rank, step, 0.25), dtype=torch.float64)),
                "max_logit": distclip.Max(torch.tensor(_value(rank, step, 0.75), dtype=torch.bfloat16)),
                "min_margin": distclip.Min(torch.tensor(-_value(rank, step, 0.5))),
            }
        with collectives() as issued, NoHostSync(host_data=step > 0):
            result = clipper.clip_(metrics=metrics)
        if world > 1:
            assert issued == clipper_step(first=step == 0), issued
        expected = {
            "tokens": sum(_value(r, step, 0.0) for r in passing),
            "z": sum(_value(r, step, 0.25) for r in passing) / len(passing),
            "max_logit": max(float(torch.tensor(_value(r, step, 0.75), dtype=torch.bfloat16)) for r in passing),
            "min_margin": min(-_value(r, step, 0.5) for r in passing),
        }
        assert set(result.metrics) == set(expected)
        for name, value in expected.items():
            got = result.metrics[name]
            assert got.dtype == torch.float64 and got.dim() == 0
            assert got.item() == pytest.approx(value, rel=1e-12), (name, got.item(), value)
        results.append({name: value.item().hex() for name, value in result.metrics.items()})
    return results


@pytest.mark.parametrize(
    "world,kinds", [(1, ["local"]), (2, ["ddp", "fsdp2", "pipeline"]), (4, ["ddp", "fsdp2", "pipeline"])],
    ids=["world1", "world2", "world4"],
)
def test_metrics_are_reduced_in_the_one_all_reduce(ranks, world, kinds):
    for kind, per_rank in by_case(ranks(world).run(every_case, _metrics, kinds)).items():
        assert all(results == per_rank[0] for results in per_rank), kind


def test_a_metric_no_rank_passed_this_step_is_nan():
    model = build()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    clipper = distclip.GradClipper(model)
    clipper.clip_(metrics={"tokens": distclip.Sum(torch.tensor(3.0))})
    result = clipper.clip_()
    assert math.isnan(result.metrics["tokens"].item())


def test_a_metric_must_be_a_sum_mean_max_or_min():
    model = build()
    with pytest.raises(ValueError, match="Sum/Mean/Max/Min"):
        distclip.GradClipper(model).clip_(metrics={"tokens": torch.tensor(3.0)})


def _token_weighted(fused):
    """Ranks hold different numbers of tokens; each backpropagates its summed token loss
    (times the world, since DDP averages), and the clipper divides by the global token count,
    reduced in its own all-reduce: the gradients, the norm and the step are those of the global
    token-mean loss (a twin computes it from every rank's tokens, with torch's clip)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = [torch.randn(3 + 4 * r, 16, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    ours = DDP(build())
    theirs = build()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01, fused=fused) for m in (ours, theirs)]
    clipper = distclip.GradClipper(ours, max_norm=0.05, divide_by="tokens")
    clipper.attach(optimizers[0])
    for _ in range(2):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        (ours(tokens[rank]).square().sum() * world).backward()
        clipper.observe_loss(None, metrics={"tokens": distclip.Sum(torch.tensor(float(len(tokens[rank]))))})
        optimizers[0].step()
        everything = torch.cat(tokens)
        (theirs(everything).square().sum() / len(everything)).backward()
        expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        optimizers[1].step()
        assert clipper.last.total_norm.item() == pytest.approx(expected.item(), rel=1e-5)
        assert clipper.last.metrics["tokens"].item() == len(everything)
    for a, b in zip(ours.module.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_token_weighted_loss_divides_by_the_global_token_count_from_the_same_all_reduce(ranks, fused):
    ranks(2).run(_token_weighted, fused)


def _periodic_metric() -> list[list[str]]:
    """``max_logit`` passed on every third step only, not on the first: each rank's collectives
    per step, after checking the metric's value on the steps it is passed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DDP(build())
    clipper = distclip.GradClipper(model, max_norm=1.0)
    issued_per_step = []
    for step in range(8):
        model.zero_grad(set_to_none=True)
        backward(model, batch(rank, seed=step))
        metrics = {"tokens": distclip.Sum(torch.tensor(4.0))}
        if step % 3 == 2:
            metrics["max_logit"] = distclip.Max(torch.tensor(10.0 + rank))
        with collectives() as issued:
            result = clipper.clip_(metrics=metrics)
        issued_per_step.append(issued)
        if step % 3 == 2 and step > 2:  # once agreed (after step 2), every passing step reports it
            assert result.metrics["max_logit"].item() == 9.0 + world, (step, result.metrics)
        if step > 3:
            assert math.isnan(result.metrics["max_logit"].item()) == (step % 3 != 2), (step, result.metrics)
    return issued_per_step


def test_a_metric_passed_every_few_steps_keeps_its_slot_once_agreed(ranks):
    for issued_per_step in ranks(2).run(_periodic_metric):
        # Agreement at the first step, and once more at the step after the metric first came.
        agreements = [step for step, issued in enumerate(issued_per_step) if issued != clipper_step(first=False)]
        assert agreements == [0, 3], issued_per_step


def test_a_count_of_nonzeros_is_not_divided_by_the_divisor_or_the_loss_scale():
    model = build()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    count = sum(p.numel() for p in model.parameters())
    clipper = distclip.GradClipper(model, max_norm=1e9, norm_type=0, divide_by="tokens")
    result = clipper.clip_(metrics={"tokens": distclip.Sum(torch.tensor(8.0))})
    assert result.total_norm.item() == count
    for p in model.parameters():  # the gradients are still divided by the token count
        torch.testing.assert_close(p.grad, torch.full_like(p, 1 / 8))


def _dtensor_scalars() -> list[str]:
    """A replicated 0-dim DTensor (``loss_parallel``'s loss) is this rank's value; a Partial one
    holds only part of it here: refused on every rank, naming the fix."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = DDP(build())
    backward(model, batch(dist.get_rank()))
    clipper = distclip.GradClipper(model, max_norm=1.0)
    replicated = DTensor.from_local(torch.tensor(3.0), mesh, [Replicate()])
    result = clipper.clip_(loss=replicated, metrics={"z": distclip.Max(replicated)})
    assert result.loss.item() == 3.0 and result.metrics["z"].item() == 3.0, (result.loss, result.metrics)
    partial = DTensor.from_local(torch.tensor(1.5), mesh, [Partial()])
    with pytest.raises(ValueError) as caught:
        clipper.clip_(metrics={"z": distclip.Max(partial)})
    return str(caught.value)


def test_a_replicated_dtensor_loss_or_metric_is_taken_and_a_partial_one_refused_on_every_rank(ranks):
    for message in ranks(2).run(_dtensor_scalars):
        assert "DTensor with placements (Partial(sum),) (pass value.full_tensor())" in message, message


def test_divide_by_a_metric_no_rank_passes_is_a_value_error_naming_it():
    model = build()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    clipper = distclip.GradClipper(model, divide_by="tokens")
    with pytest.raises(ValueError, match=r"divide_by='tokens' names no metric any rank passed \(metrics: \['token'\]\)"):
        clipper.clip_(metrics={"token": distclip.Sum(torch.tensor(8.0))})
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
