"""ES in your own DeepSpeed loop: one factory, then the data path's four calls.

::

    plan = RunPlan.build(ds_config, dp_size=dist.world_size(), num_samples=len(train),
                         epochs=1, seed=0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=engine_config(ds_config, plan))
    data = es_data_path(engine, train, plan)           # or pass ds_config instead of plan
    while (draw := data.next_step()) is not None:
        a = data.assign(draw)
        for i in range(0, a.ids.numel(), plan.geo.micro):
            mb = a.tokens[i : i + plan.geo.micro]
            loss, per_sample = weighted_step_loss(engine(input_ids=mb).logits, mb,
                                                  a.loss_weights[i : i + plan.geo.micro], -100)
            engine.backward(loss)
            engine.step()
            data.observe_training_losses(a, a.ids[i : i + plan.geo.micro], per_sample)
        record = data.finish_step(a)

`examples/deepspeed_loop.py` is this as a runnable script; `es-llm train` is the same loop
with evaluation, checkpoints and metrics around it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from es_llm import dist
from es_llm.drivers.deepspeed.dsconfig import deepspeed_config
from es_llm.drivers.scoring import ModelScorer, Scorer
from es_llm.errors import InputError
from es_llm.sampling.datapath import ESDataPath
from es_llm.sampling.plan import RunPlan

__all__ = ["engine_config", "es_data_path", "start_lr_schedule"]


def engine_config(ds_config: dict[str, Any], plan: RunPlan) -> dict[str, Any]:
    """The dict for `deepspeed.initialize`: no ES section, the plan's batch fields, and the
    LR scheduler's "auto" step counts filled from the planned steps."""
    return deepspeed_config(ds_config, plan.geo, plan.total_steps)


def start_lr_schedule(engine: Any) -> None:
    """Make optimizer step k (k = 1, 2, ...) train at iteration k of DeepSpeed's LR schedule.

    DeepSpeed's schedulers are built at iteration -1, whose learning rate is 0, and the engine
    advances them after each optimizer step, so its first two steps train at iterations -1
    and 0: both at learning rate 0 under a warmup that starts at 0 (`warmup_min_ratio` 0, the
    shipped configs). A schedule that has not started is stepped twice here, so the first step
    already learns. A resumed run loads the schedule's saved state after this, unchanged.
    """
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None or getattr(sched, "last_batch_iteration", None) != -1:
        return
    sched.step()
    sched.step()


def es_data_path(
    engine: Any,
    train_dataset: Any,
    plan: RunPlan | dict[str, Any],
    *,
    epochs: int = 1,
    seed: int = 0,
    max_steps: int | None = None,
    group: Any = None,
    scorer: Scorer | None = None,
    wrap_scorer: Callable[[Scorer], Scorer] | None = None,
    ds_config: dict[str, Any] | None = None,
    proxy_path: str | None = None,
    learner_vocab: Any = None,
    vocab_size: int | None = None,
    eod_id: int | None = None,
) -> ESDataPath:
    """The ES data path of a DeepSpeed `engine` over `train_dataset` (`input_ids`, optional
    `labels`; the row index is the global sample id).

    `plan` is the run's `RunPlan`, or the DeepSpeed config dict with its `evolved_sampling`
    section, planned here with `epochs`, `seed` and `max_steps`. `group` is the data-parallel
    process group (default: every rank). The default scorer is the engine's model, no-grad,
    in chunks of the plan's scoring micro-batch; `scorer` replaces it, `wrap_scorer(default)`
    wraps it. The engine's LR schedule, if it has not started, starts at iteration 1
    (`start_lr_schedule`): the first step trains at a non-zero learning rate.

    With ``scorer: proxy`` (and no `scorer`), the default scorer is the proxy
    (`es_llm.drivers.proxy.build_proxy_scorer`): its model from ``proxy_model`` (a preset, a
    directory, or `proxy_path` for a built ``base:``), seeded like the run, checked against
    `learner_vocab` (the run's tokenizer.json or vocabulary; None: unchecked), its rate from
    ``proxy_lr`` or `ds_config`'s optimizer (a dict `plan` is the ds_config already).
    """
    comm = dist.Communicator(group)
    if not isinstance(plan, RunPlan):
        ds_config = plan if ds_config is None else ds_config
        plan = RunPlan.build(
            plan,
            dp_size=comm.size,
            num_samples=len(train_dataset),
            epochs=epochs,
            seed=seed,
            max_steps=max_steps,
        )
    geo = plan.geo
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    if (micro, gas) != (geo.micro, geo.grad_accum):
        raise InputError(
            f"the engine trains micro-batches of {micro} x {gas} accumulation steps, the ES "
            f"plan {geo.micro} x {geo.grad_accum}: initialise the engine with "
            f"engine_config(ds_config, plan)"
        )
    start_lr_schedule(engine)
    if scorer is None and plan.es.proxy:
        from es_llm.drivers.proxy import build_proxy_scorer

        scorer = build_proxy_scorer(
            plan.es,
            getattr(engine.module, "config", None),
            comm=comm,
            micro_batch=plan.scoring_micro_batch,
            seq_len=len(train_dataset[0]["input_ids"]),
            device=dist.accelerator_device(),
            ds_config=ds_config,
            proxy_path=proxy_path,
            learner_vocab=learner_vocab,
            eod_id=eod_id,
            seed=plan.seed,
            vocab_size=vocab_size,
        )
    if scorer is None:
        scorer = ModelScorer(
            lambda: engine.module,
            micro_batch=plan.scoring_micro_batch,
            ignore_index=plan.es.ignore_index,
        )
    if wrap_scorer is not None:
        scorer = wrap_scorer(scorer)

    return ESDataPath(
        plan,
        train_dataset,
        comm=comm,
        device=dist.accelerator_device(),
        scorer=scorer,
        timer_event=dist.accelerator_event,
    )
