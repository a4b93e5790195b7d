"""Warnings that repeat per expert, sample and step, summarised once per model.

While a backbone is young its basis fields are often linearly dependent over some subdomain; the
reduced problem then gets a ridge term, as designed, and the layer says so with a
:class:`~fem_moe.errors.RankDeficientBasisWarning`. A training run meets this thousands of times
(every expert, sample and step), and the same warning on every rank. A :class:`WarningSummary`
gathers such warnings while a model trains or predicts and issues one warning for the lot: how
many solves, in which phase, the worst case. Each gathered warning is also logged at ``DEBUG``
level on the ``fem_moe`` logger, so that a user who wants every one asks for it::

    import logging
    logging.basicConfig()
    logging.getLogger("fem_moe").setLevel(logging.DEBUG)
"""
import contextlib
import logging
import warnings

from .collective import raise_on_all_ranks

__all__ = ["WarningSummary"]

logger = logging.getLogger("fem_moe")


class WarningSummary:
    """Gathers warnings of ``category`` (carrying ``rank``, ``n_basis``, ``experts`` and
    ``sample`` attributes, as :class:`~fem_moe.errors.RankDeficientBasisWarning` does) raised
    inside :meth:`gathering`, and issues their summary with :meth:`issue`. Warnings of other
    categories pass through unchanged."""

    def __init__(self, category):
        self.category = category
        self._hits, self._solved = set(), set()

    @contextlib.contextmanager
    def gathering(self, phase, step, inputs):
        """Gather the warnings raised inside, from the reduced solves of the batch ``inputs``
        (dataset indices) at ``step`` of ``phase`` (``"train"``, ``"val"``, ``"test"``). The
        context's value is a dict whose ``"count"`` is, once the block has run, the number of
        inputs on this rank with a warning."""
        inputs = tuple(int(i) for i in inputs)
        found = {"count": 0}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", self.category)
                yield found
        finally:
            # Outside the catching block: what is passed on reaches the caller's filters.
            self._solved.add((phase, step, inputs))
            hit = set()
            for w in caught:
                if not issubclass(w.category, self.category):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                    continue
                m = w.message
                sample = getattr(m, "sample", None)
                sample = None if sample is None else inputs[sample]
                hit.add(sample)
                self._hits.add((phase, step, sample, getattr(m, "rank", None),
                                getattr(m, "n_basis", None),
                                tuple(getattr(m, "experts", None) or ())))
                logger.debug("%s step %s: %s", phase, step, m)
            found["count"] = len(hit)

    def issue(self, comm, subject):
        """Collective over ``comm``: warn once, on rank 0, about the warnings every rank gathered
        since the last call (the same input found on several ranks counts once), naming
        ``subject`` (the model). Nothing when none were gathered. A summary that the caller's
        warning filters turn into an error raises on every rank."""
        hits = set().union(*comm.allgather(self._hits))
        solved = set().union(*comm.allgather(self._solved))
        self._hits, self._solved = set(), set()
        error = None
        if hits and comm.rank == 0:
            try:
                warnings.warn(self.category(self._summary(subject, hits, solved)), stacklevel=3)
            except Exception as exc:     # noqa: BLE001 -- a filter made it an error: every rank
                error = exc
        raise_on_all_ranks(comm, error)

    @staticmethod
    def _summary(subject, hits, solved):
        parts = []
        for phase in sorted({h[0] for h in hits}):
            inputs = {(p, step, sample) for p, step, sample, *_ in hits if p == phase}
            total = sum(len(batch) for p, _, batch in solved if p == phase)
            steps = {step for p, step, _ in solved if p == phase}
            unit = "step" if phase == "train" else "evaluation"
            parts.append(f"{len(inputs)} of {total} inputs over {len(steps)} {phase} {unit}"
                         f"{'' if len(steps) == 1 else 's'}")
        phase, step, sample, rank, n_basis, experts = min(
            hits, key=lambda h: (-1 if h[3] is None else h[3], h[0], h[1]))
        shown = ", ".join(map(str, experts[:8])) + (", ..." if len(experts) > 8 else "")
        where = ("the global layer" if not experts else
                 f"expert{'s' if len(experts) > 1 else ''} {shown}")
        at = f"{phase} at step {step}" + ("" if sample is None else f", dataset input {sample}")
        return (f"{subject}: the basis fields were linearly dependent for {'; '.join(parts)}; "
                f"each such reduced problem was regularised with its ridge term. Worst: "
                f"numerical rank {rank} of {n_basis} ({where}, {at}). Each one is logged at "
                "DEBUG level on the 'fem_moe' logger.")
