"""Chapter 13, FlashAttention in Triton: the graded exercises and their catalogues of mistakes.

======================  ======================================================
exercise id             reference
======================  ======================================================
``flash_fwd_kernel``    ``attnlib.triton_flash.flash_fwd_kernel`` (a kernel)
``flash_bwd_kernel``    ``attnlib.triton_flash.flash_bwd_kernel`` (a kernel)
======================  ======================================================

The learner writes the *body of a Triton kernel*, not a function: a case is not a call but a
launch. Each exercise's ``launch`` (:attr:`attnlib.grading.core.Exercise.launch`) runs the
given kernel through the course's launcher, :func:`attnlib.triton_flash.flash_forward` or
:func:`~attnlib.triton_flash.flash_backward` with ``kernel=``, which sets the grid, the block
sizes and the buffers exactly as for the course's own kernel; the learner's kernel, the
reference and every catalogued mistake are launched the same way. Without a GPU the kernels
run on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), one program after another:
slow, so the cases are small (``L, S <= 130``: up to three blocks of 64).

The cases are float32 and float16 (bfloat16 only runs on a GPU), judged by the low-precision
rule against the exact result, which ``launch`` computes in float64 with PyTorch when it is
handed float64 inputs (the rule's upcast run of the reference: a kernel has no float64 path).
The float16 cases keep the default scale, ``1 / sqrt(head_dim)``, a power of two: a kernel that
multiplies its queries by the scale before ``tl.dot`` (as Triton's tutorial once did) is exact
there, where ``q * 0.3`` rounded to float16 would cost it more than the rule's twice the
reference's error; a scale that is not a power of two is tested in float32.

A mistake is a real kernel: ``_fwd_variant`` and ``_bwd_variant`` are the course's kernels
with ``tl.constexpr`` switches, each mistake one of them launched with one switch changed
(:class:`.launching._Variant`). Two mistakes cannot be seen in the values under the
interpreter, which runs the programs one at a time and reads the masked-off lanes of a load as
zeros: a masked ``tl.load`` without ``other=`` (``_fwd_without_other``,
``_bwd_without_other``) and a ``tl.store`` of dQ that races with the other programs
(``_bwd_without_atomics`` with ``READ_ADD``: a read-modify-write instead of
``tl.atomic_add``). Both exercises' ``extra_check`` (:func:`.launching._kernel_source_check`)
reads the kernel's source and names them with :func:`attnlib.kernel_lint.lint_kernel_source`;
it also fails a kernel that calls anything but Triton's language, other ``@triton.jit``
functions and a few builtins: under the interpreter any Python runs inside a kernel, on a GPU
it would not compile. These mistakes are separate kernels because the check reads a whole
kernel's source: the switches of ``_fwd_variant`` and ``_bwd_variant`` never show it a
problem (their mistakes fail on values).

Where Triton is missing, or was imported before ``attnlib.triton_flash`` could select its
interpreter, this package raises :class:`~attnlib.grading.exercises.ChapterUnavailable`
before any of its submodules imports Triton: the other chapters are graded as usual. The
hardened grader's child runs with ``TRITON_INTERPRET=1``
(:func:`attnlib.grading.supervisor._child_env`), GPU or not.

Forbidden: the course's kernels (calling or launching them, also by giving the learner's
name to one of them: the watcher of ``attnlib grade`` sees a forbidden kernel started by
Triton's interpreter during a graded call), chapter 5's and chapter 9's attention and PyTorch's.
The launchers ``flash_forward`` and ``flash_backward`` are allowed: the notebook uses them to
run the learner's kernel.

One submodule per job: ``launching`` (what both exercises share: the launchers, the seeded
inputs, the source check, the registration), then ``forward`` and ``backward`` (each
exercise's cases and mistakes), imported here in the order the exercises are registered.
"""

from __future__ import annotations

from .. import ChapterUnavailable

try:  # Triton is the optional extra `kernels`; attnlib.triton_flash must come first
    from .... import triton_flash  # noqa: F401

    import triton.language  # noqa: F401
except ImportError as exc:  # no Triton, or Triton imported before without its interpreter
    raise ChapterUnavailable(f"chapter 13's kernels cannot run here: {exc}") from exc

#: Modules whose code this chapter's checks run on the learner's behalf (the launchers): the
#: grader's child puts their functions back before every case, as its own, should a notebook
#: replace them (:func:`attnlib.grading.child._guarded_modules`).
GUARDED = ("attnlib.triton_flash",)

from .launching import FORBIDDEN  # noqa: E402, F401  (what a graded kernel may not call or launch)

# Each submodule registers its exercise when imported: this order is the registry's.
from . import forward, backward  # noqa: E402, F401
