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
from typing import Any, TypeVar

import torch

from accel_utils.eval_samples import gather_sharded_results, shard_samples
from accel_utils.eval_shard import dp_eval_sample_shard
from accel_utils.first_rank import FirstRankPerNode
from accel_utils.topology import resolve

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ShardedGenerationEvalMixin:
    """Mix into a ``transformers.Trainer`` subclass, before ``Trainer`` in the bases.

    Set ``generation_samples`` (a list, tuple or ``datasets.Dataset``) and implement
    :meth:`generation_step` (and, for another metric than the mean, :meth:`generation_metrics`).
    ``trainer.evaluate()`` then logs ``eval_<name>`` for every generation metric beside
    ``eval_loss``, through the Trainer's normal logging and callbacks.

    Under DDP (and ZeRO-1/2) every rank generates for a disjoint shard of the samples; under
    FSDP, ZeRO-3 or TP every rank generates for all of them in lockstep; under HSDP each replica
    takes a shard. The metric is the same as one process scoring every sample.
    """

    generation_samples: Any = None
    generation_batch_size: int = 8

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

        Pass ``generate_kwargs`` on to ``model.generate``: it holds ``synced_gpus``, which must
        be True where all ranks generate in lockstep and False where they hold different shards.
        """
        raise NotImplementedError("implement generation_step(model, samples, **generate_kwargs)")

    def generation_metrics(self, results: list[Any]) -> dict[str, float]:
        """Metrics from all samples' results (in sample order); default: their mean.

        The default names it ``generation_score``.
        """
        return {"generation_score": float(sum(results) / max(1, len(results)))}

    def generation_evaluate(self, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score ``generation_samples`` with :meth:`generation_step` on this rank's shard.

        Every rank returns the same metrics, named ``<metric_key_prefix>_<name>``.
        """
        accelerator = self.accelerator  # type: ignore[attr-defined]
        shard = dp_eval_sample_shard(accelerator)
        mine = shard_samples(self.generation_samples, shard)
        topo = resolve(accelerator)
        error: BaseException | None = None
        try:
            results = self._generate(mine, synced=shard is None and topo.world_size > 1)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank together
            error, results = exc, []
        if shard is not None:  # ranks that scored their own shards fail together, not one by one
            _raise_together(error, (topo.rank, topo.world_size), accelerator)
        elif error is not None:
            raise error
        logger.debug("generation eval: shard %s, %d samples here", shard, len(mine))
        metrics = self.generation_metrics(gather_sharded_results(results, shard, group=accelerator))
        return {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}

    def _generate(self, samples: Any, synced: bool) -> list[Any]:
        model = self.model  # type: ignore[attr-defined]  # DDP's inner module; FSDP2 is in place
        was_training = model.training
        model.eval()
        results: list[Any] = []
        try:
            with torch.no_grad():
                for start in range(0, len(samples), self.generation_batch_size):
                    stop = min(start + self.generation_batch_size, len(samples))
                    batch = [samples[i] for i in range(start, stop)]
                    out = list(self.generation_step(model, batch, synced_gpus=synced))
                    if len(out) != len(batch):
                        raise ValueError(
                            f"generation_step returned {len(out)} results for {len(batch)} samples"
                        )
                    results += out
        finally:
            model.train(was_training)
        return results

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """Trainer's loop, plus the generation metrics when ``evaluate()`` runs it."""
        output = super().evaluation_loop(  # type: ignore[misc]
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        # evaluate() passes "Evaluation"; predict() passes "Prediction" and gets no extra metrics
        if description == "Evaluation" and self.generation_samples is not None:
            output.metrics.update(self.generation_evaluate(metric_key_prefix))
        return output


def _raise_together(error: BaseException | None, whole: tuple[int, int], group: Any) -> None:
    """Raise on every rank if any rank failed: the failing rank its own error, others a summary."""
    failures = gather_sharded_results([None if error is None else repr(error)], whole, group=group)
    if error is not None:
        raise error
    failed = {rank: what for rank, what in enumerate(failures) if what is not None}
    if failed:
        raise RuntimeError(f"generation eval failed on rank(s) {failed}; this rank stops too")
