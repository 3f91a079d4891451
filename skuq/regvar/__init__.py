"""RegVar: uncertainty from the variation of predictions due to regularization.

McInerney & Kallus (AISTATS 2025): a prediction that moves more when the
regularization of the training objective is perturbed is less certain. Write
the training objective as a negative log posterior over all weights,

    R(theta) = sum_n loss_n(theta) + (delta / 2) ||theta||^2,

with ``loss_n`` the net's own per-row loss and ``delta = N * weight_decay``
(the weight decay of the net's optimizer is an L2 term added to the gradient
of the *mean* loss, so ``N`` times it is the prior precision of the summed
objective). Perturbing ``R`` to ``R - lam f_k(x*)`` moves its minimizer by
``lam H^-1 J_k(x*)^T`` to first order (``H`` the true Hessian of ``R`` at
``theta*``, ``J`` the Jacobian of the outputs), hence

    (f_j(x*; theta_lam) - f_j(x*; theta*)) / lam  ->  [J H^-1 J^T]_jk   (lam -> 0),

the ``(j, k)`` entry of the linearized-Laplace covariance with the *Hessian*,
not the Gauss-Newton. Two ways to use it:

* ``exact`` (:func:`exact_covariance`, the reference): for every query row and
  output, fine-tune ``R - lam f_k(x*)`` from ``theta*`` and read one column of
  the covariance. The default solver is full-batch L-BFGS in float64 on the
  rescaled displacement ``u = (theta - theta*) / lam`` (well conditioned for
  every ``lam``), with the training gradient at ``theta*`` subtracted so that
  ``theta*`` is an exact optimum of the fine-tuned objective, as the theorem
  assumes. All (row, output) problems of a chunk are solved at once: their sum
  is separable, so its minimizer is theirs, and ``torch.func.vmap`` evaluates
  them in one pass over the training data. Costly: ``rows x outputs``
  fine-tunes. For a net whose ``P x P`` Hessian fits in memory the limit
  itself is cheaper and free of the finite-``lam`` bias
  (``skuq.regvar.hessian``: the Hessian of the objective by ``P``
  Hessian-vector products, one eigendecomposition, then one Jacobian per
  query); the estimators take it by default up to 2,500 weights, and to
  choose the prior on held-out rows (``prior_precision="heldout"``).
* ``amortized`` (:func:`finetune_pair`, the scalable form of the paper's
  pseudocode): two warm-started fine-tunes with the net's optimizer on the
  training batches, one of ``loss + (lam / N) mean|f(x_batch)|``, one of the
  loss alone, in lockstep on the same batches (so the optimizer's drift away
  from ``theta*`` cancels), each averaging its last iterates. For any ``x``
  it returns ``|f_k(x; theta_lam) - f_k(x; theta_0)| / lam``, two forward
  passes. This is *not* a variance: one perturbation moves the optimum along
  one direction ``H^-1 u`` (``u`` the gradient of the regularizer), so the
  score tends to ``|J_k(x) H^-1 u|`` -- linear in ``J(x)``, a covariance with
  one training direction, zero on the hyperplane ``J(x) H^-1 u = 0`` however
  uncertain ``x`` is. Recovering ``J H^-1 J^T`` needs perturbations that span
  ``J(x)`` (the exact mode: one per query and output). Hence ``"exact"`` is
  the default and ``"amortized"`` an opt-in, uncalibrated sensitivity score.

The core functions are plain torch (``skuq.regvar.finetune``: the amortized
pair; ``skuq.regvar.exact``: the exact solvers; ``skuq.regvar.optim``: the
trained optimizer, its cloned state and implied prior; ``skuq.regvar.hessian``:
the limit from the Hessian; ``skuq.regvar.core``:
what they share); :class:`RegVarClassifier` and :class:`RegVarRegressor`
(``skuq.regvar.estimator``) put the scikit-learn face on them.
"""

from .core import EXACT_SOLVERS, MODES, RegVarConvergenceWarning
from .estimator import RegVarClassifier, RegVarRegressor
from .exact import exact_covariance
from .finetune import amortized_variance, finetune_pair

__all__ = [
    "EXACT_SOLVERS",
    "MODES",
    "RegVarClassifier",
    "RegVarConvergenceWarning",
    "RegVarRegressor",
    "amortized_variance",
    "exact_covariance",
    "finetune_pair",
]
