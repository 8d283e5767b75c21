"""Chapter 12, the attention of today's LLMs: the graded exercises and their mistakes.

============================  ===========================================================
exercise id                   reference
============================  ===========================================================
``TransformerBlock.forward``  :class:`attnlib.TransformerBlock` (``forward``, with a KV cache)
``PagedKVCache.append``       :class:`attnlib.PagedKVCache` (``append``)
``PagedKVCache``              :class:`attnlib.PagedKVCache` (``gather``; see below)
``mla_absorbed_attention``    :func:`attnlib.mla_absorbed_attention`
``sink_window_mask``          :func:`attnlib.sink_window_mask`
``TinyGPT.generate``          :class:`attnlib.TinyGPT` (``generate``)
============================  ===========================================================

What a case cannot carry is checked by each exercise's ``extra_check``, chapter 6's way:

* ``TransformerBlock.forward``: the cache cases decode their tokens chunk by chunk through a
  fresh :class:`~attnlib.KVCache`, every chunk's output judged against the reference decoding
  the same way (:func:`.block._block_decoding`).
* ``PagedKVCache``: a case calls one method once on a fresh cache, so each case names an
  *append schedule* (:data:`.paged._SCHEDULES`: appends to several sequences, chunks
  crossing block boundaries, ``T = 0``, ``free`` and the reuse of the freed blocks, running
  out of blocks). ``append``'s check drives the learner's cache through it and compares,
  after every step, the block tables, the lengths, the free blocks and the pool at the used
  slots with the reference's (:func:`.paged._append_schedule`); ``gather``'s check fills the
  cache through the reference's state after every step and judges the learner's ``gather``
  of every sequence (:func:`.paged._gather_schedule`), so that the two are graded
  independently. A case's own call is the schedule's first ``append``: ``gather`` cannot run
  on the fresh cache a case builds (the reference has no way to load a cache's state), and
  an id ``Class.method`` must name the method its cases call, so ``gather``'s id is the
  class, as chapter 6's ``MultiHeadAttention`` grades ``forward``.
* ``mla_absorbed_attention``: on the cases whose sizes tell the axes apart, the call runs
  under a tensor recorder and fails if it builds per-head keys or values, a tensor with an
  axis of the ``S`` cached tokens and one of ``head_dim`` or ``n_heads * head_dim``
  (:func:`.mla._mla_no_per_head_kv`).
* ``TinyGPT.generate``: the model's forward calls are counted through its token embedding:
  with ``use_cache=True`` the prompt once, then one token per step through the caches; with
  ``use_cache=False`` the whole sequence every step, without caches
  (:func:`.generate._generate_calls`).

A mistake recognised by an extra check is named there, as ``judge`` names the others.

One submodule per job, imported here in the order the exercises are registered: ``block``
(``TransformerBlock.forward``), ``paged`` (both ``PagedKVCache`` exercises), ``mla``,
``sinks`` (``sink_window_mask``) and ``generate`` (``TinyGPT.generate``); ``sections`` names
the parts of the chapter's page the feedback points to.
"""

from __future__ import annotations

# Each submodule registers its exercises when imported: this order is the registry's.
from . import block, paged, mla, sinks, generate  # noqa: F401
