"""Grid search over the Laplace prior precision with scikit-learn's GridSearchCV.

The prior precision only changes the posterior, never the trained net, so a
search over it should not retrain the net for every grid value. Two ways, both
shown on scikit-learn's breast cancer data (where the bare net is overconfident):

* ``memory=``: a ``Pipeline(StandardScaler, LaplaceClassifier(net, memory=...))``
  trains the net inside ``fit`` -- honest cross-validation, each fold's net never
  sees that fold's validation rows -- and ``joblib.Memory`` caches it, so it is
  trained once per fold, not once per grid value. skuq also keeps the curvature,
  so each further grid value costs only the prior update and the predictions.
* ``FrozenEstimator``: one net trained beforehand and shared by every fold
  (cheapest). Its validation folds were part of its training data, so the
  cross-validation scores rows the net has memorized: the figure shows how that
  drives the search to the largest prior precision (no posterior at all). Use
  this route with a held-out set the net never saw, not with CV on its
  training rows.

The figure plots the cross-validated NLL of both routes against the prior
precision, with the bare net's NLL and the value that the Laplace marginal
likelihood picks without any search (no held-out data needed).

Run: python examples/grid_search_prior.py [--quick] [--out grid_search_prior.png]
"""

import argparse
import tempfile

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier

from skuq import LaplaceClassifier, MAPClassifier
from skuq.metrics import get_scorer, negative_log_likelihood
from skuq.nets import MLP


def main(quick: bool = False, out: str = "grid_search_prior.png") -> dict:
    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X.astype(np.float32), y, test_size=0.3, stratify=y, random_state=0
    )
    net = NeuralNetClassifier(
        MLP,
        module__hidden=(64, 64),
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=1e-2,
        max_epochs=10 if quick else 50,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    laplace = {"subset_of_weights": "last_layer", "hessian_structure": "kron"}
    priors = list(np.logspace(-2, 4, 5 if quick else 13))
    scoring = get_scorer("neg_negative_log_likelihood")  # higher is better: minus the NLL
    curves = {}

    with tempfile.TemporaryDirectory() as cache:
        # route 1: the net is trained in fit, once per fold thanks to memory=
        pipe = make_pipeline(
            StandardScaler(), LaplaceClassifier(net, **laplace, memory=cache, random_state=0)
        )
        search = GridSearchCV(
            pipe, {"laplaceclassifier__prior_precision": priors}, scoring=scoring, cv=3
        ).fit(X_train, y_train)
        curves["net trained per fold (memory=)"] = -search.cv_results_["mean_test_score"]
        # the bare net on the same folds: the same training, so it comes from the cache
        bare = make_pipeline(StandardScaler(), MAPClassifier(net, memory=cache, random_state=0))
        map_cv_nll = -cross_val_score(bare, X_train, y_train, scoring=scoring, cv=3).mean()
        test_nll_best = negative_log_likelihood(y_test, search.predict_proba(X_test))

    # route 2: one net trained up front, wrapped in FrozenEstimator (never retrained)
    scaler = StandardScaler().fit(X_train)
    Xs_train, Xs_test = scaler.transform(X_train), scaler.transform(X_test)
    torch.manual_seed(0)
    trained = net.fit(Xs_train, y_train)
    frozen = GridSearchCV(
        LaplaceClassifier(FrozenEstimator(trained), **laplace),
        {"prior_precision": priors},
        scoring=scoring,
        cv=3,
    )
    frozen.fit(Xs_train, y_train)
    curves["one trained net (FrozenEstimator)"] = -frozen.cv_results_["mean_test_score"]

    marglik = LaplaceClassifier(FrozenEstimator(trained), **laplace, prior_precision="marglik").fit(
        Xs_train, y_train
    )
    results = {
        "best_prior_precision": float(search.best_params_["laplaceclassifier__prior_precision"]),
        "best_prior_precision_frozen": float(frozen.best_params_["prior_precision"]),
        "marglik_prior_precision": float(marglik.prior_precision_),
        "cv_NLL_MAP": float(map_cv_nll),
        "cv_NLL_best": float(-search.best_score_),
        "test_NLL_best": test_nll_best,
        "test_NLL_MAP": negative_log_likelihood(
            y_test,
            MAPClassifier(FrozenEstimator(trained)).fit(Xs_train, y_train).predict_proba(Xs_test),
        ),
        "test_NLL_marglik": negative_log_likelihood(y_test, marglik.predict_proba(Xs_test)),
        "cv_NLL": curves,
        "grid": np.asarray(priors),
    }
    print(f"best prior precision, net per fold:   {results['best_prior_precision']:.3g}")
    print(f"best prior precision, frozen net:     {results['best_prior_precision_frozen']:.3g}")
    print(f"marginal-likelihood prior precision:  {results['marglik_prior_precision']:.3g}")
    print(
        f"CV NLL: bare net {results['cv_NLL_MAP']:.3f}, best Laplace {results['cv_NLL_best']:.3f}"
    )
    print(
        f"test NLL: bare net {results['test_NLL_MAP']:.3f}, grid search "
        f"{results['test_NLL_best']:.3f}, marglik {results['test_NLL_marglik']:.3f}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, nll in curves.items():
        ax.plot(results["grid"], nll, marker="o", label=name)
    ax.axhline(map_cv_nll, color="black", lw=1, label="bare net (MAP), per fold")
    ax.axvline(
        results["marglik_prior_precision"],
        color="grey",
        ls="--",
        label="marginal likelihood's choice",
    )
    ax.set_xscale("log")
    ax.set_xlabel("prior precision")
    ax.set_ylabel("3-fold CV NLL (lower is better)")
    ax.set_title("LaplaceClassifier (last layer, K-FAC), breast cancer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and grid values")
    parser.add_argument("--out", default="grid_search_prior.png", help="where to save the figure")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small nets: one thread is fastest, above all on a shared CPU
    main(quick=args.quick, out=args.out)
