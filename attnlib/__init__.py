"""attnlib: the reference implementation behind "Attention, from first principles".

Every chapter of the book calls these functions, and every exercise is graded against them.
Shapes follow PyTorch: ``(B, H, L, D)`` for queries and ``(B, H, S, D)`` for keys/values.
Boolean masks hold ``True`` where attention is allowed.
"""

from . import (
    attention,
    cost,
    flash,
    gqa,
    kernel_lint,
    kv_cache,
    latent,
    linear,
    masks,
    measure,
    multihead,
    paged,
    plotting,
    positional,
    rnn,
    sparse,
    tasks,
    transformer,
    vision,
)
from .attention import *  # noqa: F403  (each concept module lists its public names in __all__)
from .cost import *  # noqa: F403
from .flash import *  # noqa: F403
from .gqa import *  # noqa: F403
from .kernel_lint import *  # noqa: F403
from .kv_cache import *  # noqa: F403
from .latent import *  # noqa: F403
from .linear import *  # noqa: F403
from .masks import *  # noqa: F403
from .multihead import *  # noqa: F403
from .paged import *  # noqa: F403
from .positional import *  # noqa: F403
from .rnn import *  # noqa: F403
from .sparse import *  # noqa: F403
from .tasks import *  # noqa: F403
from .transformer import *  # noqa: F403
from .vision import *  # noqa: F403

__version__ = "0.1.0"

# The concept modules whose public names are attnlib's: a function added to one of them (and
# to its __all__) is ``attnlib.<name>`` with no edit here.
CONCEPT_MODULES = (attention, cost, flash, gqa, kernel_lint, kv_cache, latent, linear, masks,
                   multihead, paged, positional, rnn, sparse, tasks, transformer, vision)
__all__ = sorted((name for module in CONCEPT_MODULES for name in module.__all__), key=str.lower)
