"""What a ``transformers.Trainer`` subclass needs from accel-utils.

:class:`ShardedGenerationEvalMixin` gives a Trainer subclass two things through the Trainer's own
``accelerator``: dataset preparation that one rank per node runs first
(:meth:`~ShardedGenerationEvalMixin.prepare_dataset`, a :class:`~accel_utils.FirstRankPerNode`
guard), and a generation-based metric that :meth:`evaluate` adds to its usual metrics, computed
on sample shards from :func:`~accel_utils.dp_eval_sample_shard` and gathered back with
:func:`~accel_utils.gather_sharded_results`. It relies on the Trainer's public interface only, so
this module imports neither transformers nor accelerate.

End the script with :func:`accel_utils.destroy_process_group` on every rank: a finished
multi-process Trainer run otherwise aborts now and then at interpreter exit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from accel_utils.eval_samples import gather_sharded_results, shard_samples
from accel_utils.eval_shard import dp_eval_sample_shard
from accel_utils.first_rank import FirstRankPerNode
from accel_utils.topology import resolve

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _GenerationPlan:
    """What one top-level ``evaluate()`` call still has to generate: prefix -> samples."""

    runs: dict[str, Any]
    loop_prefixes: set[str]  # the metric prefixes of the evaluation loops this call runs

    def due(self, metric_key_prefix: str) -> dict[str, Any]:
        """The runs for the loop with this prefix (runs matching no loop go with the first)."""
        due = {prefix: samples for prefix, samples in self.runs.items()
               if prefix == metric_key_prefix or prefix not in self.loop_prefixes}
        for prefix in due:
            del self.runs[prefix]
        return due


class ShardedGenerationEvalMixin:
    """Mix into a ``transformers.Trainer`` subclass, before ``Trainer`` in the bases.

    Set ``generation_samples`` (a list, tuple or ``datasets.Dataset``, or a dict of them by name)
    and implement :meth:`generation_step` (and, for another metric than the mean,
    :meth:`generation_metrics`). ``trainer.evaluate()`` then logs ``eval_<name>`` for every
    generation metric beside ``eval_loss``, through the Trainer's normal logging and callbacks.
    ``predict()`` and any other use of ``evaluation_loop`` add nothing: the generation eval
    belongs to ``evaluate()``, which sets a flag for its evaluation loops (as
    ``Seq2SeqTrainer.evaluate`` hands its generation arguments to ``prediction_step``).

    Following ``Trainer.evaluate``'s conventions for a dict ``eval_dataset`` (one evaluation per
    dataset, metrics prefixed ``eval_<dataset>_``), each ``evaluate()`` call generates once per
    sample set:

    * one collection: once per ``evaluate()`` call, named with the call's prefix
      (``eval_generation_score``), with the first dataset's metrics; not once per dataset.
    * a dict ``{name: samples}``: set ``name`` is scored in the evaluation of the eval dataset
      of the same name, named like its metrics (``eval_<name>_generation_score``); a set with no
      dataset of its name is scored with the first dataset, under the same kind of name.

    Samples are generated for in batches of ``generation_batch_size``, by default the
    Trainer's ``args.per_device_eval_batch_size``.

    Under DDP (and ZeRO-1/2) every rank generates for a disjoint shard of the samples; under
    FSDP, ZeRO-3 or TP every rank generates for all of them in lockstep; under HSDP each replica
    takes a shard. The metric is the same as one process scoring every sample.

    Under HSDP (and tp inside replicas) the ranks of one replica run collectives inside
    ``generate()`` together, so ``synced_gpus`` is True there too, as under FSDP: with sampling
    (``do_sample=True``) each rank draws its own tokens and, unsynced, would stop after its own
    number of steps and hang the replica's collectives. The per-token sync spans every rank, so
    every rank also calls :meth:`generation_step` equally often: a replica with fewer batches
    runs extra one-sample batches (a repeat of one of its samples) whose results are dropped.
    The results of a replica are those of its first rank; under sampling the others' may differ.
    """

    generation_samples: Any = None
    generation_batch_size: int | None = None
    _generation_plan: _GenerationPlan | None = None

    def prepare_dataset(self, build: Callable[[], T], **guard: Any) -> T:
        """Run ``build()`` on the first rank of each node, then on the others.

        The first ranks build and cache (``save_to_disk``, ``map(cache_file_name=...)``, a
        download); the others then find the cache. A failure on a first rank raises
        ``FirstRankFailedError`` on the others instead of leaving them waiting.

        Args:
            build: returns the prepared dataset (or anything).
            **guard: keyword arguments of :class:`~accel_utils.FirstRankPerNode` (``local``,
                ``timeout``, ``path``).

        Returns:
            What ``build()`` returned on this rank.
        """
        with FirstRankPerNode(self.accelerator, **guard):  # type: ignore[attr-defined]
            return build()

    def generation_step(
        self, model: torch.nn.Module, samples: list[Any], **generate_kwargs: Any
    ) -> list[Any]:
        """Generate for ``samples`` and return one picklable result per sample (override).

        Pass ``generate_kwargs`` on to ``model.generate``: it holds ``synced_gpus``, True where
        ranks generate in lockstep (FSDP, ZeRO-3, TP, and HSDP replicas: see the class
        docstring) and False where every rank holds its own shard and a whole model (DDP).

        Args:
            model: the model to generate with, in eval mode.
            samples: one batch of samples from ``generation_samples``.
            **generate_kwargs: for ``model.generate`` (``synced_gpus``).

        Returns:
            One result per sample, in order.
        """
        raise NotImplementedError("implement generation_step(model, samples, **generate_kwargs)")

    def generation_metrics(self, results: list[Any]) -> dict[str, float]:
        """Metrics from all samples' results (in sample order); default: their mean.

        Args:
            results: every sample's result, gathered from all ranks.

        Returns:
            Metric name -> value; the default names the mean ``generation_score``.
        """
        return {"generation_score": float(sum(results) / max(1, len(results)))}

    def generation_evaluate(
        self, metric_key_prefix: str = "eval", samples: Any = None
    ) -> dict[str, float]:
        """Score samples with :meth:`generation_step`, each rank on its shard.

        Args:
            metric_key_prefix: prefix of the metric names.
            samples: what to score; None: ``generation_samples``. A dict of sample sets is
                scored set by set, each named ``<metric_key_prefix>_<set>_<metric>``.

        Returns:
            The same metrics on every rank, named ``<metric_key_prefix>_<name>``.
        """
        samples = self.generation_samples if samples is None else samples
        if isinstance(samples, dict):
            named: dict[str, float] = {}
            for name, part in samples.items():
                named.update(self.generation_evaluate(f"{metric_key_prefix}_{name}", part))
            return named
        accelerator = self.accelerator  # type: ignore[attr-defined]
        shard = dp_eval_sample_shard(accelerator)
        mine = shard_samples(samples, shard)
        topo = resolve(accelerator)
        # Ranks that share a shard (one HSDP replica, tp inside a replica) run collectives
        # inside generate() together. They stay in step only if they make the same number of
        # decoding steps, which sampling breaks (each rank draws its own tokens): so generate in
        # lockstep (synced_gpus=True, as under FSDP), whose per-step sync spans the whole group,
        # and then every rank must call generate() equally often (see _generate's calls).
        calls = None  # how many generation_step calls every rank makes, where that must agree
        if shard is not None and shard[1] < topo.world_size:  # ranks share shards
            # the largest shard's batches (shards differ by one sample at most)
            calls = _ceil_div(_ceil_div(len(samples), shard[1]), self._batch_size())
        synced = (shard is None or calls is not None) and topo.world_size > 1
        error: BaseException | None = None
        try:
            results = self._generate(mine, synced, calls=calls, filler=samples)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank together
            error, results = exc, []
        if shard is not None:  # ranks that scored their own shards fail together, not one by one
            _raise_together(error, (topo.rank, topo.world_size), accelerator)
        elif error is not None:
            raise error
        logger.debug("generation eval: shard %s, %d samples here", shard, len(mine))
        everything = gather_sharded_results(results, shard, group=accelerator)
        metrics = self.generation_metrics(everything)
        return {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}

    def _batch_size(self) -> int:
        size = self.generation_batch_size
        if size is None:
            size = int(self.args.per_device_eval_batch_size)  # type: ignore[attr-defined]
        return size

    def _generate(
        self, samples: Any, synced: bool, calls: int | None = None, filler: Any = None
    ) -> list[Any]:
        """Generate for ``samples`` in batches; with ``calls``, make that many generation_step
        calls in all: the missing ones on a one-sample batch (this shard's first sample, else
        ``filler``'s) whose results are dropped, so that every rank syncs equally often."""
        model = self.model  # type: ignore[attr-defined]  # DDP's inner module; FSDP2 is in place
        size = self._batch_size()
        was_training = model.training
        model.eval()
        results: list[Any] = []
        try:
            with torch.no_grad():
                for start in range(0, len(samples), size):
                    batch = [samples[i] for i in range(start, min(start + size, len(samples)))]
                    out = list(self.generation_step(model, batch, synced_gpus=synced))
                    if len(out) != len(batch):
                        raise ValueError(
                            f"generation_step returned {len(out)} results for {len(batch)} samples"
                        )
                    results += out
                made = _ceil_div(len(samples), size)
                if calls is not None and calls > made:
                    pad = [samples[0] if len(samples) else filler[0]]
                    for _ in range(calls - made):
                        self.generation_step(model, pad, synced_gpus=synced)
        finally:
            model.train(was_training)
        return results

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        **kwargs: Any,
    ) -> dict[str, float]:
        """``Trainer.evaluate``, plus the generation metrics (see the class docstring).

        Args:
            eval_dataset: as ``Trainer.evaluate``: None (``self.eval_dataset``), a dataset, or a
                dict of them by name.
            ignore_keys: as ``Trainer.evaluate``.
            metric_key_prefix: as ``Trainer.evaluate``.
            **kwargs: passed on (``Seq2SeqTrainer.evaluate``'s generation arguments).

        Returns:
            ``Trainer.evaluate``'s metrics with the generation metrics added.
        """
        evaluate: Callable[..., dict[str, float]] = super().evaluate  # type: ignore[misc]
        if self._generation_plan is not None or self.generation_samples is None:
            # Trainer.evaluate calling itself once per dataset of a dict: the outer call planned
            return evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        datasets = eval_dataset
        if datasets is None:
            datasets = self.eval_dataset  # type: ignore[attr-defined]
        samples = self.generation_samples
        runs = ({f"{metric_key_prefix}_{name}": part for name, part in samples.items()}
                if isinstance(samples, dict) else {metric_key_prefix: samples})
        loops = ({f"{metric_key_prefix}_{name}" for name in datasets}
                 if isinstance(datasets, dict) else {metric_key_prefix})
        self._generation_plan = _GenerationPlan(runs, loops)
        try:
            return evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        finally:
            self._generation_plan = None

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """Trainer's loop, plus the generation metrics due when ``evaluate()`` runs it."""
        output = super().evaluation_loop(  # type: ignore[misc]
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        plan = self._generation_plan  # set by evaluate() only: predict() gets no extra metrics
        if plan is not None:
            for prefix, samples in plan.due(metric_key_prefix).items():
                output.metrics.update(self.generation_evaluate(prefix, samples))
        return output


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _raise_together(error: BaseException | None, whole: tuple[int, int], group: Any) -> None:
    """Raise on every rank if any rank failed: the failing rank its own error, others a summary."""
    failures = gather_sharded_results([None if error is None else repr(error)], whole, group=group)
    if error is not None:
        raise error
    failed = {rank: what for rank, what in enumerate(failures) if what is not None}
    if failed:
        raise RuntimeError(f"generation eval failed on rank(s) {failed}; this rank stops too")
