"""The built-in propagation rules (registered on import).

"Exact" below means exact for the model's assumption: independent Gaussian weights
and, per unit, independent Gaussian inputs. That assumption holds for a layer whose
inputs are deterministic or come from independent sources; it fails wherever two
units share a random ancestor -- the outputs of one layer with random weights are
correlated with each other (a convolution's positions, a per-token Linear's tokens,
the hidden units of an MLP two layers below a random layer). A rule that sums or
mixes such units (Linear, convolution, pooling, mean) is then exact *under
independence* only; ``docs/methods/cvp.md`` gives the measured error per source.
One such case is handled: a global average pool reached from a shared-weight layer
through per-position maps gets the cross-position covariance of that layer's weight
noise (:mod:`skuq.cvp.pooled`).

Supported out of the box:

* weights: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``F.linear`` (exact
  for independent inputs and weights); ``nn.BatchNorm1d/2d`` in eval mode
  (affine, exact); ``nn.LayerNorm``, ``F.layer_norm`` and ``nn.RMSNorm`` (the
  expected-statistic rule, approximate); ``nn.MultiheadAttention``,
  ``F.scaled_dot_product_attention``, ``nn.TransformerEncoderLayer`` and
  ``nn.TransformerEncoder`` (attention weights from the means, variance
  through the values and the output projection: approximate);
* activations: ReLU, LeakyReLU (exact), GELU, SiLU, sigmoid, tanh (see
  :mod:`skuq.cvp.moments`), ELU and Softplus (Gauss-Hermite quadrature);
  clamp (exact); softmax, log-softmax and log of a positive tensor by
  linearization (named as such; attention weights stay softmax of the means);
* structure: ``+``/``-`` (variances add: exact for independent operands;
  ``torch.add``'s ``alpha``), products (independent factors; ``h * h`` and
  ``x ** 2`` are exact squares), ``@`` (independent factors), division by
  constants, indexing, flatten, reshape/view, permute/transpose, (un)squeeze,
  cat/stack, chunk/split (exact), mean/sum and average pooling (exact for
  independent entries), max pooling (Clark's moment matching, folded over the
  window: approximate), dropout and identity (eval mode).
"""

# importing the families registers their rules
from . import (  # noqa: F401
    activations,
    arithmetic,
    attention,
    linear,
    normalization,
    pooling,
    shape,
    softmax,
)
from .activations import elementwise_rule, linearized_rule
from .arithmetic import square_moments
from .linear import linear_moments

__all__ = ["linear_moments", "elementwise_rule", "linearized_rule", "square_moments"]
