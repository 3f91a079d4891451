"""ScaLLA: linearized Laplace through a learned surrogate of the neural tangent kernel.

The linearized Laplace approximation (LLA) of a trained net ``f(x; theta*)``
is a Gaussian process with kernel ``K(x, x') = J(x) J(x')^T`` (the NTK at
``theta*``, ``C x C`` per pair of rows). ScaLLA (arXiv 2601.21835) learns a
small network ``g: x -> R^{C x m}`` whose inner product reproduces it,
``g(x) g(x')^T ~= K(x, x')``, and then does Laplace in the ``m``-dimensional
feature space:

* **Kernel fit from JVPs only.** For random probes ``v`` with
  ``E[v v^T] = I`` (Rademacher or Gaussian), ``z = J(x) v`` is one
  Jacobian-vector product and ``E[z(x) z(x')^T] = K(x, x')``. With ``S``
  probes per step, the stacked batch features ``G`` (``BC x m``) and probe
  outputs ``Z`` (``BC x S``),

      ||G^T G||^2 - (2/S) ||G^T Z||^2 + sum_{s != t} (z_s^T z_t)^2 / (S (S-1))

  is an unbiased estimate of the kernel-matching loss
  ``sum_{ij} ||g_i g_j^T - K_ij||_F^2`` (:func:`kernel_matching_loss`): the
  middle term is linear in ``Z Z^T / S`` and the last is a U-statistic for
  ``||K||_F^2``. The Jacobian is never formed; probes are drawn in chunks of at
  most ``max_probe_elements`` entries, so memory stays flat in ``P`` beyond
  the net itself (about two weight vectors: the one the JVPs take and one
  probe).
* **Feature-space Laplace.** ``A = tau I_m + sum_n g_n^T Lambda_n g_n`` and
  ``Var f(x*) = g(x*) A^-1 g(x*)^T`` (:func:`feature_posterior`), with the
  shared :class:`~skuq.posterior.FullPosterior` engine. The evidence is the
  weight-space Laplace evidence ``log p(D|theta*) - tau ||theta*||^2 / 2 -
  log det(I + G / tau) / 2``: when the learned kernel equals the NTK on the
  training rows and ``m >= rank J``, ``G`` and the GGN ``H`` have the same
  non-zero spectrum, so ``tau`` by marginal likelihood is the full LLA's
  prior precision, and the predictive equals the full LLA's wherever the
  kernel matches (the GP form of the LLA depends on kernel values only).
* **Kernel biasing with context points** (the paper's biased kernel; its
  exact recipe is not in the seed, this is our choice). Rows passed as
  ``context`` (e.g. an OOD proxy set) join the kernel fit, with weight
  ``context_weight`` on their pairs, but not the likelihood. The ``m``
  features then have to represent the NTK at those rows as well, so the
  predictive variance there is not lost to a surrogate that only ever saw
  training inputs. Limitation (as the paper states): this helps only where
  the context set resembles the OOD inputs met at test time; context far from
  them spends feature capacity for nothing.

What the surrogate learns. The Frobenius loss weighs a kernel direction by
its squared eigenvalue, and NTK spectra span many decades, so ``g`` learns
the top directions first -- like a Nystrom or low-rank LLA (laplace-torch's
ELLA). Directions far below the top, which the exact LLA variance still
counts where their eigenvalue exceeds the prior precision, are learned
slowly or not at all; the tests measure this on a tiny net.

Our choices besides: fresh probes every step (memory flat in ``N``), Adam
with a cosine decay, targets divided by the NTK's mean diagonal, a learned
output gain started at that scale, and a default surrogate built from the
input shape (:func:`default_surrogate`).

The core (:func:`draw_probes`, :func:`probe_outputs`,
:func:`kernel_matching_loss`, :func:`default_surrogate`,
:func:`fit_surrogate`, :func:`feature_posterior`, :func:`scalla_predictive`)
is plain torch (modules ``probes``, ``surrogate`` and ``features`` of this
package); :class:`ScaLLAClassifier` (module ``estimator``) is the scikit-learn
face.
"""

from .estimator import ScaLLAClassifier, clear_surrogate_cache
from .features import FeaturePosterior, feature_posterior, scalla_predictive
from .probes import MAX_PROBE_ELEMENTS as MAX_PROBE_ELEMENTS
from .probes import PROBES, draw_probes, kernel_matching_loss, probe_outputs
from .surrogate import (
    SURROGATES,
    SurrogateFit,
    SurrogateKernel,
    default_surrogate,
    fit_surrogate,
)

__all__ = [
    "PROBES",
    "SURROGATES",
    "FeaturePosterior",
    "ScaLLAClassifier",
    "SurrogateFit",
    "clear_surrogate_cache",
    "SurrogateKernel",
    "default_surrogate",
    "draw_probes",
    "feature_posterior",
    "fit_surrogate",
    "kernel_matching_loss",
    "probe_outputs",
    "scalla_predictive",
]
